import { closedLoop } from '../closedloop.js'
import { duration, machine, progress, round, settingsBase as base, withTarget } from '../lab.js'
import type { ScenarioResult, Table } from '../report.js'
import type { ServerSettings } from '../server.js'

export async function deadlock (): Promise<ScenarioResult> {
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
