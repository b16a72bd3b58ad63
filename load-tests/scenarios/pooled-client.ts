// An open-loop client that reuses a pool of keep-alive connections, as a
// service calling another through undici, or a proxy pooling its upstream
// connections, does: do refusals reach it as fast 503s, or as timeouts?
import { readFileSync } from 'node:fs'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { Pool } from 'undici'
import { closedLoop } from '../closedloop.js'
import { capacity } from '../gate.js'
import { machine, num, progress, round, settingsBase, withTarget } from '../lab.js'
import type { ScenarioResult, Table } from '../report.js'
import type { ServerSettings } from '../server.js'
import { median, summarize, type Latency } from '../stats.js'

export interface PooledOptions {
  origin: string
  path: string
  /** Arrivals per second (Poisson). */
  rate: number
  /**
   * Seconds before the measured ones, over which the rate rises to `rate`:
   * the pool opens its connections and the server warms up. A cold jump to
   * 25x capacity made the generator itself collapse on a 2-core machine
   * (every request timed out, with the brake off as with it on).
   */
  warmupS: number
  durationS: number
  timeoutMs: number
  connections: number
}

export interface PooledResult {
  /** Requests sent during the measured seconds, and what became of them. */
  offered: number
  ok: number
  /** 503 (or 429) answers received within the timeout. */
  refused: number
  timeouts: number
  errors: number
  goodputPerS: number
  /** Client-side time from sending to the end of a 503. */
  refusedLatency: Latency
  okLatency: Latency
  /** Requests sent during the warm-up that timed out, and their 503s. */
  warmupTimeouts: number
  warmupRefused: number
  generatorLagP99Ms: number
}

class Tally {
  offered = 0
  timeouts = 0
  errors = 0
  readonly ok: number[] = []
  readonly refused: number[] = []
}

/**
 * Poisson arrivals on one undici Pool. A Pool hands each request to its
 * first idle connection, so a few connections carry most of the traffic and
 * every refusal on one is soon followed by another request on it: to the
 * server, that looks like a client retrying on the connection it was refused on.
 */
export async function pooledOpenLoop (options: PooledOptions): Promise<PooledResult> {
  const pool = new Pool(options.origin, { connections: options.connections, pipelining: 1, keepAliveTimeout: 10_000 })
  const warmup = new Tally()
  const measured = new Tally()
  const pending = new Set<Promise<void>>()
  // Every request has the same timeout, so deadlines come in the order
  // requests leave: one sweep aborts the overdue ones, where a timer per
  // request (AbortSignal.timeout) costs the generator a third of its time at 5,000/s.
  const deadlines: Array<{ at: number, controller: AbortController, done: boolean }> = []
  let head = 0
  const sweep = setInterval(() => {
    const now = performance.now()
    while (head < deadlines.length && deadlines[head].at <= now) {
      const d = deadlines[head++]
      if (!d.done) d.controller.abort()
    }
    if (head > 4096) {
      deadlines.splice(0, head)
      head = 0
    }
  }, 5)

  const fire = (tally: Tally): void => {
    tally.offered++
    const started = performance.now()
    const deadline = { at: started + options.timeoutMs, controller: new AbortController(), done: false }
    deadlines.push(deadline)
    const p = pool.request({ path: options.path, method: 'GET', signal: deadline.controller.signal }).then(async (res) => {
      await res.body.dump()
      deadline.done = true
      const elapsed = performance.now() - started
      if (elapsed > options.timeoutMs) tally.timeouts++
      else if (res.statusCode >= 200 && res.statusCode < 300) tally.ok.push(elapsed)
      else if (res.statusCode === 503 || res.statusCode === 429) tally.refused.push(elapsed)
      else tally.errors++
    }, (err: Error) => {
      deadline.done = true
      if (err.name === 'AbortError' || deadline.controller.signal.aborted) tally.timeouts++
      else tally.errors++
    }).finally(() => { pending.delete(p) })
    pending.add(p)
  }

  const lag = monitorEventLoopDelay({ resolution: 5 })
  const start = performance.now()
  const measureFrom = start + options.warmupS * 1000
  const end = measureFrom + options.durationS * 1000
  let next = start
  for (;;) {
    const now = performance.now()
    if (now >= end) break
    if (now >= measureFrom) lag.enable()
    while (next <= now) {
      const warming = next < measureFrom
      fire(warming ? warmup : measured)
      const rate = warming ? options.rate * Math.max(0.05, (next - start) / (measureFrom - start)) : options.rate
      next += -Math.log(1 - Math.random()) * 1000 / rate
    }
    await new Promise((resolve) => setTimeout(resolve, 1))
  }
  await Promise.all(pending)
  clearInterval(sweep)
  lag.disable()
  await pool.destroy()
  return {
    offered: measured.offered,
    ok: measured.ok.length,
    refused: measured.refused.length,
    timeouts: measured.timeouts,
    errors: measured.errors,
    goodputPerS: measured.ok.length / options.durationS,
    refusedLatency: summarize(measured.refused),
    okLatency: summarize(measured.ok),
    warmupTimeouts: warmup.timeouts,
    warmupRefused: warmup.refused.length,
    generatorLagP99Ms: lag.percentile(99) / 1e6
  }
}

/** Busy CPU time of the whole machine so far, in seconds, from /proc/stat (Linux); null elsewhere. */
function machineBusyS (): number | null {
  try {
    // cpu  user nice system idle iowait irq softirq steal ..., in USER_HZ (100 on Linux)
    const fields = readFileSync('/proc/stat', 'utf8').slice(0, 200).split('\n')[0].trim().split(/\s+/).slice(1, 9).map(Number)
    return (fields.reduce((sum, x) => sum + x, 0) - fields[3] - fields[4]) / 100
  } catch {
    return null
  }
}

/** Waits, up to two minutes, for a second in which the machine is all but idle. */
async function quiet (what: string): Promise<void> {
  const deadline = performance.now() + (ATTEMPTS === 1 ? 10_000 : 120_000)
  for (let waited = false; ;) {
    const before = machineBusyS()
    await new Promise((resolve) => setTimeout(resolve, 1000))
    const after = machineBusyS()
    if (before === null || after === null || after - before < DISTURBED_CORES || performance.now() > deadline) return
    if (!waited) progress(`${what}: waiting for other processes to leave the machine (${(after - before).toFixed(2)} cores busy)`)
    waited = true
  }
}

/** Above this many cores used by other processes during a run, the run is disturbed and run again. */
export const DISTURBED_CORES = Number(process.env.LAB_DISTURBED_CORES ?? 0.3)
/** Runs of one measurement at most; LAB_ATTEMPTS=1 takes the first, whatever the neighbours did (shown in the tables). */
const ATTEMPTS = Number(process.env.LAB_ATTEMPTS ?? 8)

/**
 * Runs a measurement until other processes on the machine leave it alone
 * (they use less than DISTURBED_CORES during it), at most ATTEMPTS times; a
 * shared 2-core machine otherwise starves the server or the generator and
 * the figures describe the neighbours. `measure` returns its result and the
 * CPU seconds the server used; the generator is this process.
 */
export async function undisturbed<T> (what: string, measure: () => Promise<{ result: T, serverCpuS: number }>): Promise<{ result: T, othersCores: number, attempts: number }> {
  for (let attempt = 1; ; attempt++) {
    await quiet(what)
    const busy = machineBusyS()
    const cpu = process.cpuUsage()
    const started = performance.now()
    const { result, serverCpuS } = await measure()
    const wallS = (performance.now() - started) / 1000
    const after = machineBusyS()
    const own = process.cpuUsage(cpu)
    const othersCores = busy === null || after === null ? 0 : Math.max(0, (after - busy - serverCpuS - (own.user + own.system) / 1e6) / wallS)
    if (othersCores < DISTURBED_CORES || attempt >= ATTEMPTS) return { result, othersCores, attempts: attempt }
    progress(`${what}: other processes used ${othersCores.toFixed(2)} cores during the run; running it again`)
  }
}

const DURATION_S = 8
const WARMUP_S = 2
const CONNECTIONS = 4096
const MULTIPLES = [10, 25]

interface Run {
  capacityPerS: number
  offeredPerS: number
  goodputPerS: number
  goodputPct: number
  refused: number
  timeouts: number
  /** Client timeouts per 503 received, in percent. */
  timeoutPct: number
  refusedP50: number
  refusedP99: number
  /** Client timeouts of requests sent during the warm-up. */
  warmupTimeouts: number
  okP99Server: number
  errors: number
  generatorLagP99: number
  serverEldP99: number
  /** CPU other processes used during the run, in cores. */
  othersCores: number
  attempts: number
}

export async function pooledClient (): Promise<ScenarioResult> {
  const repeats = num('repeats')
  const timeoutMs = num('client-timeout')
  // The set-up of issue 9: a downstream of 10 calls of 50 ms at once (200/s),
  // a plugin with as many slots, as deep a queue, and a short queue timeout.
  const base: ServerSettings = { ...settingsBase, variant: 'plugin', maxConcurrency: 10, maxQueue: 10, queueTimeout: 100, serviceTime: 50, downstreamConcurrency: 10 }
  const nominal = capacity(base.maxConcurrency, base.serviceTime)
  const variants: Array<{ name: string, settings: ServerSettings }> = [
    { name: 'rejectDelay 0', settings: { ...base, plugin: { rejectDelay: 0 } } },
    { name: 'defaults', settings: base }
  ]
  const runs = new Map<string, Run[]>()
  for (let r = 0; r < repeats; r++) {
    for (const multiple of MULTIPLES) {
      const order = r % 2 === 0 ? variants : [...variants].reverse()
      for (const v of order) {
        // A fresh server for each run: nothing the brake learnt in one run
        // carries over to the next.
        const { result: { res, s, capacityPerS }, othersCores, attempts } = await undisturbed(`pooled client ${multiple}x, ${v.name}`, async () => withTarget(v.settings, async (target) => {
          // One connection per slot: what this server serves at its limit,
          // on this machine, now; goodput is held to it.
          const atLimit = await closedLoop(`${target.origin}/work`, base.maxConcurrency, 3)
          const capacityPerS = Math.min(nominal, atLimit.okPerS)
          await target.reset()
          const res = await pooledOpenLoop({ origin: target.origin, path: '/work', rate: nominal * multiple, warmupS: WARMUP_S, durationS: DURATION_S, timeoutMs, connections: CONNECTIONS })
          const s = await target.stats()
          return { result: { res, s, capacityPerS }, serverCpuS: s.cpuMicros / 1e6 }
        }))
        const run: Run = {
          capacityPerS,
          offeredPerS: res.offered / DURATION_S,
          goodputPerS: res.goodputPerS,
          goodputPct: 100 * res.goodputPerS / capacityPerS,
          refused: res.refused,
          timeouts: res.timeouts,
          timeoutPct: 100 * res.timeouts / Math.max(1, res.refused),
          refusedP50: res.refusedLatency.p50,
          refusedP99: res.refusedLatency.p99,
          warmupTimeouts: res.warmupTimeouts,
          okP99Server: s.okLatency.p99,
          errors: res.errors,
          generatorLagP99: res.generatorLagP99Ms,
          serverEldP99: s.eventLoopDelayP99Ms,
          othersCores,
          attempts
        }
        const key = `${multiple}|${v.name}`
        runs.set(key, [...(runs.get(key) ?? []), run])
        progress(`pooled client ${multiple}x, ${v.name} ${r + 1}/${repeats}: capacity ${capacityPerS.toFixed(0)}/s, goodput ${run.goodputPct.toFixed(1)}%, ` +
          `503 ${run.refused}, timeouts ${run.timeouts} (${run.timeoutPct.toFixed(2)}%; ${run.warmupTimeouts} in warm-up), p99 503 ${run.refusedP99.toFixed(1)} ms, ` +
          `generator lag p99 ${run.generatorLagP99.toFixed(1)} ms, others ${othersCores.toFixed(2)} cores`)
      }
    }
  }
  // Median, then the range of the runs: a noisy machine shows as a wide one.
  const cell = (key: string, field: keyof Run, digits = 1): string => {
    const values = (runs.get(key) ?? []).map((run) => run[field])
    const show = (x: number) => round(x, digits).toFixed(digits)
    return `${show(median(values))} (${show(Math.min(...values))}-${show(Math.max(...values))})`
  }
  const rows: Array<Array<string | number>> = []
  for (const multiple of MULTIPLES) {
    for (const v of variants) {
      const key = `${multiple}|${v.name}`
      rows.push([`${multiple}x`, v.name, cell(key, 'capacityPerS', 0), cell(key, 'offeredPerS', 0), cell(key, 'goodputPerS', 0), cell(key, 'goodputPct'),
        cell(key, 'refused', 0), cell(key, 'timeouts', 0), cell(key, 'timeoutPct', 2), cell(key, 'refusedP50'), cell(key, 'refusedP99'), cell(key, 'warmupTimeouts', 0), cell(key, 'okP99Server'), cell(key, 'errors', 0), cell(key, 'generatorLagP99'), cell(key, 'serverEldP99'), cell(key, 'othersCores', 2)])
    }
  }
  const table: Table = {
    title: `Pooled open-loop client (undici Pool of ${CONNECTIONS} keep-alive connections, Poisson arrivals, ${timeoutMs} ms timeout; downstream of ${base.maxConcurrency} x ${base.serviceTime} ms = ${nominal}/s; ` +
      `plugin maxConcurrency ${base.maxConcurrency}, maxQueue ${base.maxQueue}, queueTimeout ${base.queueTimeout}; capacity measured at the limit (${base.maxConcurrency} connections); ` +
      `${WARMUP_S} s of warm-up rising to the rate, then ${DURATION_S} s measured; x ${repeats}, median (min-max))`,
    columns: ['load', 'variant', 'capacity/s', 'offered/s', '2xx/s', '% of capacity', '503', 'timeouts', 'timeouts per 503 %', 'p50 503 ms', 'p99 503 ms', 'timeouts in warm-up', 'p99 2xx ms (server, with warm-up)', 'errors', 'generator lag p99 ms', 'server ELD p99 ms (with warm-up)', 'other processes, cores'],
    rows
  }
  return { scenario: 'pooled-client', title: 'Pooled open-loop client: refusals or timeouts', options: { ...base, warmup: WARMUP_S, duration: DURATION_S, repeats, timeoutMs, connections: CONNECTIONS }, machine, tables: [table], charts: [], data: Object.fromEntries(runs) }
}
