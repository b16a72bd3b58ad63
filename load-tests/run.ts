// The load-test lab. Usage: node load-tests/.out/run.js <scenario> [--flags]
//   bench       overhead of the plugin on hello-world (req/s, server CPU per request)
//   explosion   closed-loop connection sweep, bare vs plugin
//   goodput     open-loop goodput at multiples of capacity, and a step profile
//   threads     a new worker thread per request vs a bounded pool behind the plugin
//   deadlock    a route calling its own server: shared pool vs queue timeout vs separate pools
//   reject-cost server CPU of a refusal against the floor (node:http) and a Fastify 200
//   retry-storm closed loop that retries every refusal at once: bare vs the plugin's mechanisms
//   all         every scenario above but bench, then the HTML report
//   ci          short profile that fails when an invariant breaks
import { mkdirSync, writeFileSync } from 'node:fs'
import { execSync } from 'node:child_process'
import { availableParallelism } from 'node:os'
import { parseArgs } from 'node:util'
import { fileURLToPath } from 'node:url'
import { closedLoop } from './closedloop.js'
import { capacity, checkGate } from './gate.js'
import { openLoop } from './openloop.js'
import { printTable, stepSummary, writeHtmlReport, type Chart, type ScenarioResult, type Table } from './report.js'
import { median } from './stats.js'
import { Target } from './target.js'
import type { ServerSettings } from './server.js'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    'service-time': { type: 'string', default: '20' },
    'memory-kib': { type: 'string', default: '64' },
    'max-concurrency': { type: 'string', default: '100' },
    'max-queue': { type: 'string', default: '100' },
    'queue-timeout': { type: 'string', default: '1000' },
    connections: { type: 'string', default: '10,100,1000,5000' },
    rates: { type: 'string', default: '0.5,1,2,5,10,25,50' },
    // Open loop: the generator needs about one core for 10k requests/s, so
    // 50x capacity must stay near that: 10 slots / 50 ms = 200/s by default.
    'goodput-max-concurrency': { type: 'string', default: '10' },
    'goodput-service-time': { type: 'string', default: '50' },
    'thread-connections': { type: 'string', default: '10,100,500' },
    'cpu-ms': { type: 'string', default: '5' },
    'storm-connections': { type: 'string', default: '1000,5000' },
    // Long enough for steady state: the first second of a storm is all refusals.
    'storm-duration': { type: 'string', default: '10' },
    duration: { type: 'string', default: '5' },
    repeats: { type: 'string', default: '3' },
    'client-timeout': { type: 'string', default: '1000' },
    results: { type: 'string', default: fileURLToPath(new URL('../results', import.meta.url)) }
  }
})

function num (name: keyof typeof values): number {
  const value = Number(values[name])
  if (!Number.isFinite(value) || value < 0) throw new Error(`--${name} must be a number >= 0, got ${String(values[name])}`)
  return value
}
const list = (name: 'connections' | 'rates' | 'thread-connections' | 'storm-connections') => String(values[name]).split(',').map(Number)

const settingsBase: ServerSettings = {
  variant: 'plugin',
  serviceTime: num('service-time'),
  memoryKiB: num('memory-kib'),
  maxConcurrency: num('max-concurrency'),
  maxQueue: num('max-queue'),
  queueTimeout: num('queue-timeout')
}
const base = settingsBase
const duration = num('duration')
const machine = { cores: availableParallelism(), node: process.version, platform: process.platform, date: new Date().toISOString() }
const resultsDir = String(values.results)

// Each connection is a file descriptor in the generator and one in the
// server. Node cannot raise its own limit: the npm scripts try (ulimit -n).
function checkFdLimit (connections: number): void {
  let limit = Infinity
  try {
    const out = execSync('ulimit -n', { shell: '/bin/sh', encoding: 'utf8' }).trim()
    if (out !== 'unlimited') limit = Number(out)
  } catch {}
  if (limit < connections + 512) {
    progress(`the open-file limit is ${limit}: runs above ${limit - 512} connections will see connection errors (raise it with ulimit -n, the OS refused more)`)
  }
}

function progress (message: string): void {
  process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${message}\n`)
}

function save (result: ScenarioResult): void {
  mkdirSync(resultsDir, { recursive: true })
  writeFileSync(`${resultsDir}/${result.scenario}.json`, JSON.stringify(result, null, 2) + '\n')
  for (const table of result.tables) printTable(table)
  stepSummary(result.tables)
}

async function withTarget<T> (settings: ServerSettings, fn: (target: Target) => Promise<T>): Promise<T> {
  const target = await Target.start(settings)
  try {
    return await fn(target)
  } finally {
    await target.stop()
  }
}

const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits

async function bench (): Promise<ScenarioResult> {
  const repeats = num('repeats')
  const connections = 50
  const variants: CostVariant[] = [
    { name: 'bare Fastify', settings: { ...base, variant: 'bare' }, path: '/hello' },
    { name: 'with the plugin', settings: { ...base, variant: 'plugin', maxConcurrency: 10_000, maxQueue: 0 }, path: '/hello' },
    // The yardstick: what two empty hooks cost, measured the same way.
    { name: 'two empty hooks, no plugin', settings: { ...base, variant: 'bare', emptyHooks: true }, path: '/hello-hooks' }
  ]
  const figures = await measureCost(variants, repeats, connections)
  const bare = figures.get(variants[0].name) as { rps: number[], cpu: number[] }
  const table: Table = {
    title: `Overhead on hello-world (${connections} connections, ${duration} s x ${repeats}, interleaved, medians of per-round ratios)`,
    columns: ['variant', 'req/s', 'server CPU µs/req', 'req/s ratio', 'CPU/req ratio'],
    rows: variants.map((v) => {
      const f = figures.get(v.name) as { rps: number[], cpu: number[] }
      const rpsRatio = median(f.rps.map((x, i) => x / bare.rps[i]))
      const cpuRatio = median(f.cpu.map((x, i) => x / bare.cpu[i]))
      return [v.name, round(median(f.rps), 0), round(median(f.cpu), 2), rpsRatio.toFixed(3), cpuRatio.toFixed(3)]
    })
  }
  return { scenario: 'bench', title: 'Overhead benchmark', options: { connections, duration, repeats }, machine, tables: [table], charts: [], data: Object.fromEntries(figures) }
}

interface CostVariant {
  name: string
  settings: ServerSettings
  path: string
  /** Take the saturated pool's only slot first, so that every request is refused. */
  saturate?: boolean
}

/** Server CPU per response of each variant, measured interleaved; medians. */
async function measureCost (variants: CostVariant[], repeats: number, connections: number): Promise<Map<string, { rps: number[], cpu: number[] }>> {
  const out = new Map(variants.map((v) => [v.name, { rps: [] as number[], cpu: [] as number[] }]))
  for (let r = 0; r < repeats; r++) {
    const order = r % 2 === 0 ? variants : [...variants].reverse()
    for (const v of order) {
      await withTarget(v.settings, async (target) => {
        const holder = new AbortController()
        if (v.saturate === true) {
          fetch(`${target.origin}/saturate`, { signal: holder.signal }).catch(() => {})
          await new Promise((resolve) => setTimeout(resolve, 100))
        }
        await closedLoop(`${target.origin}${v.path}`, connections, 1)
        await target.reset()
        const res = await closedLoop(`${target.origin}${v.path}`, connections, duration)
        const stats = await target.stats()
        holder.abort()
        if (v.settings.variant === 'plugin' && v.saturate !== true && (stats.plugin as { admitted: number }).admitted < res.total) {
          throw new Error('the plugin did not see every request: the benchmark would not measure it')
        }
        const cpu = stats.cpuMicros / Math.max(1, res.total)
        out.get(v.name)?.rps.push(res.total / res.durationS)
        out.get(v.name)?.cpu.push(cpu)
        progress(`${v.name} ${r + 1}/${repeats}: ${(res.total / res.durationS).toFixed(0)} responses/s, ${cpu.toFixed(2)} µs CPU/response`)
      })
    }
  }
  return out
}

async function rejectCost (): Promise<ScenarioResult> {
  const repeats = num('repeats')
  const connections = 50
  // Without the retry-storm brake: this measures what one refusal costs.
  const plugin: ServerSettings = { ...base, variant: 'plugin', plugin: { rejectDelay: 0 } }
  const variants: CostVariant[] = [
    { name: 'Fastify 200 (hello)', settings: { ...base, variant: 'bare' }, path: '/hello' },
    { name: 'node:http 503', settings: { ...base, variant: 'raw' }, path: '/' },
    { name: 'Fastify 503 from onRequest', settings: { ...base, variant: 'bare' }, path: '/early-503' },
    { name: 'plugin 503 (rejectDelay 0)', settings: plugin, path: '/rejected', saturate: true }
  ]
  const figures = await measureCost(variants, repeats, connections)
  const bare = median(figures.get(variants[0].name)?.cpu ?? [])
  const table: Table = {
    title: `Cost of a response (${connections} connections, ${duration} s x ${repeats}, medians; server CPU per response)`,
    columns: ['response', 'responses/s', 'CPU µs/response', 'x a Fastify 200'],
    rows: variants.map((v) => {
      const f = figures.get(v.name) as { rps: number[], cpu: number[] }
      return [v.name, round(median(f.rps), 0), round(median(f.cpu), 2), (median(f.cpu) / bare).toFixed(2)]
    })
  }
  return { scenario: 'reject-cost', title: 'Cost of a rejection', options: { connections, duration, repeats }, machine, tables: [table], charts: [], data: Object.fromEntries(figures) }
}

async function storm (): Promise<ScenarioResult> {
  const repeats = num('repeats')
  const stormDuration = num('storm-duration')
  const ideal = capacity(base.maxConcurrency, base.serviceTime)
  const variants: Array<{ name: string, settings: ServerSettings }> = [
    { name: 'bare Fastify', settings: { ...base, variant: 'bare' } },
    { name: 'plugin, defaults (rejectDelay 1000)', settings: { ...base, variant: 'plugin' } },
    { name: 'plugin, no delay', settings: { ...base, variant: 'plugin', plugin: { rejectDelay: 0 } } },
    { name: 'plugin, no delay, closeOnReject', settings: { ...base, variant: 'plugin', plugin: { rejectDelay: 0, closeOnReject: true } } },
    { name: 'plugin, rejectDelay 250', settings: { ...base, variant: 'plugin', plugin: { rejectDelay: 250 } } }
  ]
  type Run = { okPerS: number, rejectedPerS: number, errors: number, p50: number, p99: number, eldP99: number, rssPeakMB: number, peakInFlight: number }
  const runs = new Map<string, Run[]>()
  for (const connections of list('storm-connections')) {
    for (let r = 0; r < repeats; r++) {
      const order = r % 2 === 0 ? variants : [...variants].reverse()
      for (const v of order) {
        const run = await withTarget(v.settings, async (target) => {
          await target.reset()
          const res = await closedLoop(`${target.origin}/work`, connections, stormDuration)
          const s = await target.stats()
          return { okPerS: res.okPerS, rejectedPerS: res.rejectedPerS, errors: res.errors + res.timeouts, p50: s.okLatency.p50, p99: s.okLatency.p99, eldP99: s.eventLoopDelayP99Ms, rssPeakMB: s.rssPeakMB, peakInFlight: s.peakInFlight }
        })
        const key = `${connections}|${v.name}`
        runs.set(key, [...(runs.get(key) ?? []), run])
        progress(`storm ${connections} connections, ${v.name} ${r + 1}/${repeats}: ${run.okPerS.toFixed(0)} 2xx/s, ${run.rejectedPerS.toFixed(0)} 503/s, p99 2xx ${run.p99.toFixed(1)} ms`)
      }
    }
  }
  const med = (key: string, field: keyof Run) => median((runs.get(key) ?? []).map((r) => r[field]))
  const rows: Array<Array<string | number>> = []
  for (const connections of list('storm-connections')) {
    const bare = med(`${connections}|bare Fastify`, 'okPerS')
    // The best a limit of maxConcurrency can do, or what the server does without one if less.
    const best = Math.min(ideal, bare)
    for (const v of variants) {
      const key = `${connections}|${v.name}`
      rows.push([connections, v.name, round(med(key, 'okPerS'), 0), round(100 * med(key, 'okPerS') / best), round(med(key, 'rejectedPerS'), 0), round(med(key, 'errors'), 0), round(med(key, 'p50')), round(med(key, 'p99')), round(med(key, 'eldP99')), round(med(key, 'rssPeakMB')), round(med(key, 'peakInFlight'), 0)])
    }
  }
  const table: Table = {
    title: `Retry storm, closed loop (every refusal retried at once; route waits ${base.serviceTime} ms; maxConcurrency ${base.maxConcurrency}, maxQueue ${base.maxQueue}; ideal = min(${ideal}/s, bare); ${stormDuration} s x ${repeats}, medians)`,
    columns: ['connections', 'variant', '2xx/s', '% of ideal', '503/s', 'errors + timeouts', 'p50 2xx ms (server)', 'p99 2xx ms (server)', 'ELD p99 ms', 'RSS peak MB', 'peak in-flight'],
    rows
  }
  return { scenario: 'retry-storm', title: 'Retry storm', options: { ...base, duration: stormDuration, repeats }, machine, tables: [table], charts: [], data: Object.fromEntries(runs) }
}

async function explosion (): Promise<ScenarioResult> {
  const steps = list('connections')
  const rows: Array<Record<string, number | string>> = []
  for (const connections of steps) {
    for (const variant of ['bare', 'plugin'] as const) {
      const row = await withTarget({ ...base, variant }, async (target) => {
        await target.reset()
        const res = await closedLoop(`${target.origin}/work`, connections, duration)
        const s = await target.stats()
        return { variant, connections, okPerS: round(res.okPerS, 0), rejectedPerS: round(res.rejectedPerS, 0), errors: res.errors, timeouts: res.timeouts, p50: round(s.okLatency.p50), p99: round(s.okLatency.p99), max: round(s.okLatency.max), clientP99: res.latency.p99, rssPeakMB: round(s.rssPeakMB), eldP99: round(s.eventLoopDelayP99Ms), peakInFlight: s.peakInFlight }
      })
      progress(`explosion ${connections} connections ${variant}: ${row.okPerS} 2xx/s, ${row.rejectedPerS} 503/s, p99 2xx ${row.p99} ms, RSS ${row.rssPeakMB} MB`)
      rows.push(row)
    }
  }
  const table: Table = {
    title: `Connection explosion, closed loop (route waits ${base.serviceTime} ms and holds ${base.memoryKiB} KiB; plugin maxConcurrency ${base.maxConcurrency}, maxQueue ${base.maxQueue})`,
    columns: ['connections', 'variant', '2xx/s', '503/s', 'errors', 'timeouts', 'p50 2xx ms', 'p99 2xx ms', 'max 2xx ms', 'p99 all answers ms (client)', 'RSS peak MB', 'ELD p99 ms', 'peak in-flight'],
    rows: rows.map((r) => [r.connections, r.variant, r.okPerS, r.rejectedPerS, r.errors, r.timeouts, r.p50, r.p99, r.max, r.clientP99, r.rssPeakMB, r.eldP99, r.peakInFlight])
  }
  const series = (key: string) => (['bare', 'plugin'] as const).map((v) => ({ name: v, points: rows.filter((r) => r.variant === v).map((r) => [r.connections as number, r[key] as number] as [number, number]) }))
  const charts: Chart[] = [
    { title: 'p99 latency of 2xx vs connections', x: 'connections', y: 'ms', logX: true, series: series('p99') },
    { title: 'Server RSS peak vs connections', x: 'connections', y: 'MB', logX: true, series: series('rssPeakMB') },
    { title: '2xx per second vs connections', x: 'connections', y: 'req/s', logX: true, series: series('okPerS') }
  ]
  return { scenario: 'explosion', title: 'Connection explosion (closed loop, autocannon)', options: { ...base, duration, steps }, machine, tables: [table], charts, data: rows }
}

async function goodput (): Promise<ScenarioResult> {
  const maxConcurrency = num('goodput-max-concurrency')
  // The downstream serves as many calls at once as the plugin admits: the
  // capacity is then physical, for bare Fastify too.
  const base: ServerSettings = { ...settingsBase, maxConcurrency, maxQueue: maxConcurrency, serviceTime: num('goodput-service-time'), downstreamConcurrency: maxConcurrency }
  const cap = capacity(base.maxConcurrency, base.serviceTime)
  const timeoutMs = num('client-timeout')
  const rows: Array<Record<string, number | string>> = []
  for (const multiple of list('rates')) {
    for (const variant of ['bare', 'plugin'] as const) {
      const row = await withTarget({ ...base, variant }, async (target) => {
        await target.reset()
        const res = await openLoop({ url: `${target.origin}/work`, rate: cap * multiple, durationS: duration, timeoutMs, connections: 4096 })
        const s = await target.stats()
        return { variant, multiple, targetPerS: cap * multiple, generatorLagP99: round(res.generatorLagP99Ms), serverP99: round(s.okLatency.p99), offeredPerS: round(res.offeredPerS, 0), goodputPerS: round(res.goodputPerS, 0), goodputPct: round(100 * res.goodputPerS / cap), rejected: res.rejected, timeouts: res.timeouts, errors: res.errors, p50: round(res.latencyOk.p50), p99: round(res.latencyOk.p99), max: round(res.latencyOk.max), rssPeakMB: round(s.rssPeakMB), eldP99: round(s.eventLoopDelayP99Ms), peakInFlight: s.peakInFlight }
      })
      progress(`goodput ${multiple}x ${variant}: offered ${row.offeredPerS}/s, goodput ${row.goodputPerS}/s (${row.goodputPct}% of capacity), p99 ${row.p99} ms`)
      rows.push(row)
    }
  }
  // Step profile: 0.5x, then 10x, then 0.5x again; goodput per 0.5 s shows recovery.
  const phase = duration
  const profile = (t: number) => cap * (t < phase || t >= 2 * phase ? 0.5 : 10)
  const steps: Record<string, Array<{ t: number, offeredPerS: number, goodputPerS: number }>> = {}
  for (const variant of ['bare', 'plugin'] as const) {
    steps[variant] = await withTarget({ ...base, variant }, async (target) => {
      const res = await openLoop({ url: `${target.origin}/work`, rate: profile, durationS: 3 * phase, timeoutMs, connections: 4096, bucketS: 0.5 })
      return res.series
    })
    progress(`step profile ${variant} done`)
  }
  const recovery = (series: Array<{ t: number, goodputPerS: number, offeredPerS: number }>) => {
    const after = series.filter((p) => p.t >= 2 * phase)
    const ok = after.find((p) => p.goodputPerS >= 0.9 * p.offeredPerS)
    return ok === undefined ? 'not within the run' : `${round(ok.t - 2 * phase)} s`
  }
  const tables: Table[] = [{
    title: `Open-loop goodput (Poisson arrivals, ${timeoutMs} ms client timeout; a downstream of ${base.maxConcurrency} parallel calls of ${base.serviceTime} ms: capacity ${cap}/s; plugin maxConcurrency ${base.maxConcurrency}, maxQueue ${base.maxQueue})`,
    columns: ['load', 'variant', 'target/s', 'offered/s', 'goodput/s', '% of capacity', '503', 'timeouts', 'errors', 'p50 2xx ms', 'p99 2xx ms', 'max 2xx ms', 'p99 2xx ms (server)', 'RSS peak MB', 'ELD p99 ms', 'peak in-flight', 'generator lag p99 ms'],
    rows: rows.map((r) => [`${r.multiple}x`, r.variant, r.targetPerS, r.offeredPerS, r.goodputPerS, r.goodputPct, r.rejected, r.timeouts, r.errors, r.p50, r.p99, r.max, r.serverP99, r.rssPeakMB, r.eldP99, r.peakInFlight, r.generatorLagP99])
  }, {
    title: `Step profile 0.5x -> 10x -> 0.5x (${phase} s each): time to recover 90% goodput after the spike`,
    columns: ['variant', 'recovery'],
    rows: (['bare', 'plugin'] as const).map((v) => [v, recovery(steps[v])])
  }]
  const charts: Chart[] = [
    { title: 'Goodput vs offered load', x: 'offered load (x capacity)', y: '2xx within timeout / s', logX: true, series: (['bare', 'plugin'] as const).map((v) => ({ name: v, points: rows.filter((r) => r.variant === v).map((r) => [r.multiple as number, r.goodputPerS as number] as [number, number]) })) },
    { title: 'p99 latency of 2xx vs offered load', x: 'offered load (x capacity)', y: 'ms', logX: true, series: (['bare', 'plugin'] as const).map((v) => ({ name: v, points: rows.filter((r) => r.variant === v).map((r) => [r.multiple as number, r.p99 as number] as [number, number]) })) },
    { title: 'Step profile: goodput over time', x: 's', y: '2xx / s', series: (['bare', 'plugin'] as const).map((v) => ({ name: v, points: steps[v].map((p) => [p.t, p.goodputPerS] as [number, number]) })) }
  ]
  return { scenario: 'goodput', title: 'Overload goodput (open loop)', options: { ...base, duration, timeoutMs }, machine, tables, charts, data: { rows, steps } }
}

async function threads (): Promise<ScenarioResult> {
  const cpuMs = num('cpu-ms')
  const rows: Array<Record<string, number | string>> = []
  const variants = [
    { variant: 'bare' as const, path: '/cpu-thread', name: 'thread per request' },
    { variant: 'plugin' as const, path: '/cpu-pool', name: 'pool + plugin' }
  ]
  for (const connections of list('thread-connections')) {
    for (const v of variants) {
      const row = await withTarget({ ...base, variant: v.variant, cpuMs }, async (target) => {
        await closedLoop(`${target.origin}${v.path}`, 2, 1)
        await target.reset()
        const res = await closedLoop(`${target.origin}${v.path}`, connections, duration, 30)
        const s = await target.stats()
        return { variant: v.name, connections, okPerS: round(res.okPerS, 0), rejectedPerS: round(res.rejectedPerS, 0), errors: res.errors, timeouts: res.timeouts, p50: round(s.okLatency.p50), p99: round(s.okLatency.p99), clientP99: res.latency.p99, threadsPeak: s.threadsPeak, rssPeakMB: round(s.rssPeakMB), eldP99: round(s.eventLoopDelayP99Ms) }
      })
      progress(`threads ${connections} connections, ${v.name}: ${row.okPerS} 2xx/s, ${row.threadsPeak} threads, RSS ${row.rssPeakMB} MB, p99 2xx ${row.p99} ms`)
      rows.push(row)
    }
  }
  const table: Table = {
    title: `Thread explosion (${cpuMs} ms of CPU per request; pool = ${machine.cores} piscina threads, piscina maxQueue ${machine.cores * 4}, plugin maxConcurrency ${machine.cores * 2}, maxQueue ${machine.cores * 8})`,
    columns: ['connections', 'variant', '2xx/s', '503/s', 'errors', 'timeouts', 'p50 2xx ms', 'p99 2xx ms', 'p99 all answers ms (client)', 'threads peak', 'RSS peak MB', 'ELD p99 ms'],
    rows: rows.map((r) => [r.connections, r.variant, r.okPerS, r.rejectedPerS, r.errors, r.timeouts, r.p50, r.p99, r.clientP99, r.threadsPeak, r.rssPeakMB, r.eldP99])
  }
  const series = (key: string) => variants.map((v) => ({ name: v.name, points: rows.filter((r) => r.variant === v.name).map((r) => [r.connections as number, r[key] as number] as [number, number]) }))
  return {
    scenario: 'threads',
    title: 'Thread explosion (closed loop, autocannon)',
    options: { cpuMs, duration },
    machine,
    tables: [table],
    charts: [
      { title: 'Threads peak vs connections', x: 'connections', y: 'threads', logX: true, series: series('threadsPeak') },
      { title: 'RSS peak vs connections (threads)', x: 'connections', y: 'MB', logX: true, series: series('rssPeakMB') }
    ],
    data: rows
  }
}

async function deadlock (): Promise<ScenarioResult> {
  const maxConcurrency = 10
  const connections = 50
  const cases = [
    { name: 'shared pool, queueTimeout 30 s', queueTimeout: 30_000, inner: 'shared' },
    { name: 'shared pool, queueTimeout 200 ms', queueTimeout: 200, inner: 'shared' },
    { name: 'separate pools', queueTimeout: 200, inner: 'own' }
  ]
  const rows: Array<Record<string, number | string>> = []
  for (const c of cases) {
    const settings: ServerSettings = { ...base, variant: 'plugin', maxConcurrency, maxQueue: 100, queueTimeout: c.queueTimeout }
    const row = await withTarget(settings, async (target) => {
      const url = `${target.origin}/outer?inner=${c.inner}`
      const res = await closedLoop(url, connections, duration, 5)
      // Recovery: once the load stops, how long until one request succeeds?
      const stopped = performance.now()
      let recoveredMs = -1
      while (performance.now() - stopped < 35_000) {
        const probe = await fetch(url).catch(() => null)
        if (probe?.status === 200) { recoveredMs = performance.now() - stopped; break }
        await new Promise((resolve) => setTimeout(resolve, 50))
      }
      return { case: c.name, okPerS: round(res.okPerS, 1), failedPerS: round(res.rejectedPerS, 1), timeouts: res.timeouts, p99: res.latency.p99, recoveredMs: round(recoveredMs, 0) }
    })
    progress(`deadlock, ${c.name}: ${row.okPerS} 2xx/s, ${row.failedPerS} failed/s, ${row.timeouts} timeouts, recovered after ${row.recoveredMs} ms`)
    rows.push(row)
  }
  const table: Table = {
    title: `Deadlock by self-call (/outer calls /inner on the same server; maxConcurrency ${maxConcurrency}, ${connections} connections, ${duration} s, client timeout 5 s)`,
    columns: ['case', '2xx/s', 'failed/s', 'client timeouts', 'p99 ms', 'first success after load, ms'],
    rows: rows.map((r) => [r.case, r.okPerS, r.failedPerS, r.timeouts, r.p99, r.recoveredMs])
  }
  return { scenario: 'deadlock', title: 'Deadlock by self-call', options: { maxConcurrency, connections, duration }, machine, tables: [table], charts: [], data: rows }
}

async function ci (): Promise<boolean> {
  // Small enough for a 2-core CI machine to offer 10x capacity in open loop.
  const settings: ServerSettings = { ...base, variant: 'plugin', maxConcurrency: 10, maxQueue: 10, queueTimeout: 200, serviceTime: 20 }
  const cap = capacity(settings.maxConcurrency, settings.serviceTime)
  const { moderate, overload, peakInFlight } = await withTarget(settings, async (target) => {
    progress('gate: moderate closed loop (5 connections, 3 s)')
    const moderate = await closedLoop(`${target.origin}/work`, 5, 3)
    progress(`gate: open loop at 10x capacity (${cap * 10}/s, 6 s)`)
    const overload = await openLoop({ url: `${target.origin}/work`, rate: cap * 10, durationS: 6, timeoutMs: 1000, connections: 2048 })
    const s = await target.stats()
    return { moderate, overload, peakInFlight: s.peakInFlight }
  })
  // Retry storm: the plugin against bare Fastify in the same run.
  const stormSettings: ServerSettings = { ...base, maxConcurrency: 100, maxQueue: 100, queueTimeout: 1000, serviceTime: 20 }
  const storm: Record<string, number> = {}
  for (const variant of ['bare', 'plugin'] as const) {
    progress(`gate: retry storm, ${variant} (1000 connections, 8 s)`)
    storm[variant] = await withTarget({ ...stormSettings, variant }, async (target) => (await closedLoop(`${target.origin}/work`, 1000, 8)).okPerS)
  }
  const checks = checkGate({
    ...settings,
    latencyMarginMs: 100,
    peakInFlight,
    overload: { goodputPerS: overload.goodputPerS, p99OkMs: overload.latencyOk.p99, errors: overload.errors },
    moderate: { errors: moderate.errors, timeouts: moderate.timeouts, non2xx: Math.round(moderate.rejectedPerS * moderate.durationS) },
    minGoodputRatio: 0.9,
    storm: { bareOkPerS: storm.bare, pluginOkPerS: storm.plugin, ideal: capacity(stormSettings.maxConcurrency, stormSettings.serviceTime), minRatio: 0.85 }
  })
  const table: Table = { title: 'Load-test gate', columns: ['check', 'result', 'figures'], rows: checks.map((c) => [c.name, c.pass ? 'pass' : 'FAIL', c.detail]) }
  printTable(table)
  stepSummary([table])
  const failed = checks.filter((c) => !c.pass).length
  console.log(`gate: ${checks.length - failed} passed, ${failed} failed`)
  return failed === 0
}

const scenario = positionals[0] ?? 'all'
checkFdLimit(Math.max(...list('connections'), ...list('storm-connections'), 2048))
switch (scenario) {
  case 'bench':
    save(await bench())
    break
  case 'explosion':
    save(await explosion())
    break
  case 'goodput':
    save(await goodput())
    break
  case 'reject-cost':
    save(await rejectCost())
    break
  case 'retry-storm':
    save(await storm())
    break
  case 'threads':
    save(await threads())
    break
  case 'deadlock':
    save(await deadlock())
    break
  case 'all':
    save(await explosion())
    save(await goodput())
    save(await threads())
    save(await deadlock())
    save(await rejectCost())
    save(await storm())
    progress(`report: ${writeHtmlReport(resultsDir)}`)
    break
  case 'report':
    progress(`report: ${writeHtmlReport(resultsDir)}`)
    break
  case 'ci':
    if (!await ci()) process.exitCode = 1
    break
  default:
    console.error(`unknown scenario "${scenario}": use bench, explosion, goodput, threads, deadlock, all, report or ci`)
    process.exitCode = 2
}
