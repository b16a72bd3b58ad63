import { closedLoop } from '../closedloop.js'
import { duration, list, machine, progress, round, settingsBase as base, withTarget } from '../lab.js'
import type { Chart, ScenarioResult, Table } from '../report.js'

export async function explosion (): Promise<ScenarioResult> {
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
