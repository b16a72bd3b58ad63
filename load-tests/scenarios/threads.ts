import { closedLoop } from '../closedloop.js'
import { duration, list, machine, num, progress, round, settingsBase as base, withTarget } from '../lab.js'
import type { ScenarioResult, Table } from '../report.js'

export async function threads (): Promise<ScenarioResult> {
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
