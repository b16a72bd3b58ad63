import { capacity } from '../gate.js'
import { duration, list, machine, num, progress, round, settingsBase, withTarget } from '../lab.js'
import { openLoop } from '../openloop.js'
import type { Chart, ScenarioResult, Table } from '../report.js'
import type { ServerSettings } from '../server.js'

export async function goodput (): Promise<ScenarioResult> {
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
