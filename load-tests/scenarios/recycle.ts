// Worker recycling under load. runCluster with two workers serves a route
// that leaks 10 KiB per request on purpose; an undici keep-alive client
// (GET and POST, on a schedule) and autocannon (GET and POST, at a set rate)
// load it for the run's length. Variants: no recycling (RSS grows without
// bound), maxRssMb a little above the idle RSS, and maxRequests. Reported:
// RSS over time, recycles, failed requests (socket errors, resets, timeouts,
// non-2xx) and throughput per second around each recycle.
//
// The load is offered at a set rate so that the leak, and the run's memory,
// stay bounded on a shared machine: a dip in the seconds of a recycle shows
// as answers that come late, not as a lower ceiling.
import { fork, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import autocannon from 'autocannon'
import { Pool } from 'undici'
import { machine, progress, resultsDir, round, values } from '../lab.js'
import type { Chart, ScenarioResult, Table } from '../report.js'
import { median } from '../stats.js'

const serverPath = fileURLToPath(new URL('./recycle-server.js', import.meta.url))

export type Variant = 'none' | 'memory' | 'requests'

interface Sample { t: number, workers: Array<{ pid: number, state: string, rssMB: number }> }
interface RecycleMark { t: number, reason: string, pid: number }

export interface RecycleRun {
  variant: Variant
  options: Record<string, unknown>
  durationS: number
  /** Requests per second offered, both clients. */
  rate: number
  ok: number
  failed: number
  failures: Record<string, number>
  recycles: RecycleMark[]
  /**
   * Answers (2xx) to the scheduled undici client completed in each second of
   * the load (autocannon's -R sends each second's allowance in one burst).
   */
  perSecond: number[]
  medianPerS: number
  /** The lowest second that saw a recycle, as a fraction of the median. */
  worstRecycleSecondRatio: number | null
  /** The lowest of the other seconds: the noise floor to compare it with. */
  worstOtherSecondRatio: number | null
  idleRssMB: number
  maxRssMB: number
  /** Max RSS of the workers at each sample: [seconds, MB]. */
  rss: Array<[number, number]>
  cut: { drains: number, inFlight: number, idle: number }
}

class Server {
  readonly child: ChildProcess
  readonly samples: Sample[] = []
  readonly recycles: RecycleMark[] = []
  port = 0
  closedStats: { cut: RecycleRun['cut'] } | null = null

  constructor (options: Record<string, unknown>) {
    this.child = fork(serverPath, [JSON.stringify({ logger: false, ...options })], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
    this.child.on('message', (message: { type: string } & Record<string, unknown>) => {
      if (message.type === 'stats') this.samples.push(message as unknown as Sample)
      if (message.type === 'recycle') this.recycles.push(message as unknown as RecycleMark)
      if (message.type === 'closed') this.closedStats = message.stats as { cut: RecycleRun['cut'] }
    })
  }

  async ready (): Promise<void> {
    for (;;) {
      const [message] = await once(this.child, 'message') as [{ type: string, port: number }]
      if (message.type === 'ready') {
        this.port = message.port
        return
      }
    }
  }

  async close (): Promise<void> {
    const exited = once(this.child, 'exit')
    this.child.send({ type: 'close' })
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 30_000)
    await exited
    clearTimeout(timer)
  }

  /** The highest RSS among workers serving, in the last sample. */
  idleRss (): number {
    const last = this.samples.at(-1)
    return last === undefined ? 0 : Math.max(...last.workers.map((w) => w.rssMB))
  }
}

/** Open loop on undici keep-alive connections: `rate` requests per second, GET and POST in turn. */
async function undiciLoad (origin: string, rate: number, durationS: number, perSecond: number[], failures: Record<string, number>): Promise<number> {
  const pool = new Pool(origin, { connections: 32, pipelining: 1, headersTimeout: 5000, bodyTimeout: 5000 })
  const start = performance.now()
  const pending = new Set<Promise<void>>()
  let ok = 0
  let sent = 0
  const fail = (why: string): void => { failures[why] = (failures[why] ?? 0) + 1 }
  const one = async (post: boolean): Promise<void> => {
    try {
      const response = await pool.request(post
        ? { method: 'POST', path: '/', body: '{"n":1}', headers: { 'content-type': 'application/json' } }
        : { method: 'GET', path: '/' })
      await response.body.dump()
      if (response.statusCode >= 200 && response.statusCode < 300) {
        ok++
        const second = Math.floor((performance.now() - start) / 1000)
        perSecond[second] = (perSecond[second] ?? 0) + 1
      } else fail(`undici ${post ? 'POST' : 'GET'} ${response.statusCode}`)
    } catch (error) {
      fail(`undici ${post ? 'POST' : 'GET'} ${(error as { code?: string }).code ?? (error as Error).message}`)
    }
  }
  while (performance.now() - start < durationS * 1000) {
    const due = Math.floor((performance.now() - start) / 1000 * rate)
    while (sent < due) {
      const p = one(sent % 2 === 1)
      pending.add(p)
      p.finally(() => pending.delete(p)).catch(() => {})
      sent++
    }
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
  await Promise.all(pending)
  await pool.close()
  return ok
}

/** autocannon at `rate` requests per second overall, GET and POST in turn. */
async function autocannonLoad (origin: string, rate: number, durationS: number, failures: Record<string, number>): Promise<number> {
  let done: (result: autocannon.Result) => void = () => {}
  let failed: (error: Error) => void = () => {}
  const finished = new Promise<autocannon.Result>((resolve, reject) => { done = resolve; failed = reject })
  autocannon({
    url: origin,
    connections: 8,
    overallRate: rate,
    duration: durationS,
    timeout: 5,
    requests: [
      { method: 'GET', path: '/' },
      { method: 'POST', path: '/', body: '{"n":1}', headers: { 'content-type': 'application/json' } }
    ]
  }, (error, result) => { if (error !== null && error !== undefined) failed(error as Error); else done(result) })
  const result = await finished
  const add = (why: string, n: number): void => { if (n > 0) failures[why] = (failures[why] ?? 0) + n }
  add('autocannon errors', result.errors)
  add('autocannon timeouts', result.timeouts)
  add('autocannon non-2xx', result.non2xx)
  add('autocannon resets', result.resets)
  return result['2xx']
}

export async function probeIdleRss (): Promise<number> {
  const server = new Server({})
  await server.ready()
  while (server.samples.length < 4) await once(server.child, 'message')
  const idle = server.idleRss()
  await server.close()
  return idle
}

export async function runVariant (variant: Variant, durationS: number, rate: number, idleRssMB: number, override: Record<string, unknown> = {}): Promise<RecycleRun> {
  const options: Record<string, unknown> = {}
  if (variant === 'memory') options.maxRssMb = Math.ceil(idleRssMB + Number(values['recycle-rss-margin']))
  // Each worker takes half the load: a recycle every ~10 s each.
  if (variant === 'requests') {
    options.maxRequests = Math.round(rate / 2 * 10)
    options.maxRequestsJitter = Math.round(rate / 2 * 2)
  }
  Object.assign(options, override)
  progress(`recycle ${variant}: ${JSON.stringify(options)}, ${rate}/s (half undici keep-alive, half autocannon), ${durationS} s`)
  const server = new Server(options)
  await server.ready()
  const origin = `http://127.0.0.1:${server.port}`
  const perSecond: number[] = []
  const failures: Record<string, number> = {}
  const loadStart = server.samples.at(-1)?.t ?? 0
  const [a, b] = await Promise.all([
    undiciLoad(origin, rate / 2, durationS, perSecond, failures),
    autocannonLoad(origin, rate / 2, durationS, failures)
  ])
  await server.close()
  const seconds = perSecond.slice(1, durationS - 1).map((n) => n ?? 0)
  const med = median(seconds)
  const recycles = server.recycles.map((r) => ({ t: round(r.t - loadStart, 2), reason: r.reason, pid: r.pid }))
  const recycleSeconds = [...new Set(recycles.map((r) => Math.floor(r.t)).filter((s) => s >= 1 && s < durationS - 1))]
  const ratios = recycleSeconds.map((s) => (perSecond[s] ?? 0) / med)
  const others = seconds.map((n, i) => ({ n, s: i + 1 })).filter(({ s }) => !recycleSeconds.includes(s)).map(({ n }) => n / med)
  const rss: Array<[number, number]> = server.samples
    .filter((s) => s.t >= loadStart && s.workers.length > 0)
    .map((s) => [round(s.t - loadStart, 2), round(Math.max(...s.workers.map((w) => w.rssMB)), 1)])
  const failed = Object.values(failures).reduce((x, y) => x + y, 0)
  const run: RecycleRun = {
    variant,
    options,
    durationS,
    rate,
    ok: a + b,
    failed,
    failures,
    recycles,
    perSecond: perSecond.map((n) => n ?? 0),
    medianPerS: med,
    worstRecycleSecondRatio: ratios.length === 0 ? null : round(Math.min(...ratios), 3),
    worstOtherSecondRatio: others.length === 0 ? null : round(Math.min(...others), 3),
    idleRssMB: round(idleRssMB, 1),
    maxRssMB: round(Math.max(...rss.map(([, mb]) => mb)), 1),
    rss,
    cut: server.closedStats?.cut ?? { drains: 0, inFlight: 0, idle: 0 }
  }
  progress(`recycle ${variant}: ${run.ok} ok, ${run.failed} failed ${JSON.stringify(failures)}, ${recycles.length} recycles, ` +
    `RSS max ${run.maxRssMB} MB (idle ${run.idleRssMB}), median ${med}/s (undici), worst recycle second ${run.worstRecycleSecondRatio ?? '-'} of the median, worst other second ${run.worstOtherSecondRatio ?? '-'}`)
  return run
}

export async function recycle (): Promise<ScenarioResult> {
  const durationS = Number(values['recycle-duration'])
  const rate = Number(values['recycle-rate'])
  const variants = String(values['recycle-variants']).split(',') as Variant[]
  const idle = await probeIdleRss()
  progress(`recycle: idle worker RSS ${round(idle, 1)} MB`)
  // Each variant may run on its own (a minute each, to keep one run short):
  // the runs of other variants already in the results folder are kept.
  const file = join(resultsDir, 'recycle.json')
  const earlier = existsSync(file) ? (JSON.parse(readFileSync(file, 'utf8')) as { data: RecycleRun[] }).data.filter((r) => !variants.includes(r.variant)) : []
  const runs: RecycleRun[] = [...earlier]
  for (const variant of variants) runs.push(await runVariant(variant, durationS, rate, idle))
  const order: Variant[] = ['none', 'memory', 'requests']
  runs.sort((x, y) => order.indexOf(x.variant) - order.indexOf(y.variant))
  const table: Table = {
    title: 'Worker recycling: 2 workers, a route leaking 10 KiB per request, GET and POST from undici keep-alive + autocannon at a set rate',
    columns: ['variant', 'offered', 'options', 'recycles', 'answered (2xx)', 'failed', 'RSS max MB', 'RSS max / maxRssMb', 'median /s (undici)', 'worst recycle second / median', 'worst other second / median', 'cut'],
    rows: runs.map((r) => [
      r.variant,
      `${r.rate}/s, ${r.durationS} s`,
      JSON.stringify(r.options),
      r.recycles.length,
      r.ok,
      r.failed,
      r.maxRssMB,
      typeof r.options.maxRssMb === 'number' ? round(r.maxRssMB / r.options.maxRssMb, 2) : '-',
      r.medianPerS,
      r.worstRecycleSecondRatio ?? '-',
      r.worstOtherSecondRatio ?? '-',
      r.cut.inFlight + r.cut.idle
    ])
  }
  const charts: Chart[] = [{
    title: 'Highest worker RSS over time (MB)',
    x: 'seconds',
    y: 'RSS MB',
    series: runs.map((r) => ({ name: r.variant === 'none' ? 'no recycling' : r.variant === 'memory' ? `maxRssMb ${String(r.options.maxRssMb)}` : `maxRequests ${String(r.options.maxRequests)}`, points: r.rss }))
  }]
  return { scenario: 'recycle', title: 'Worker recycling under keep-alive load', options: { durationS, rate, variants }, machine, tables: [table], charts, data: runs }
}
