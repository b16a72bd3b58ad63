import { execSync } from 'node:child_process'
import { closedLoop } from '../closedloop.js'
import { duration, machine, progress, round, settingsBase as base, withTarget } from '../lab.js'
import type { ScenarioResult, Table } from '../report.js'

const COUNTERS = ['TcpExtListenOverflows', 'TcpExtTCPSynRetrans']

// The kernel's TCP counters since the last call (nstat keeps the last
// reading), or null where nstat is missing. Counts the whole machine.
function nstat (): Record<string, number> | null {
  try {
    const out = execSync(`nstat -z ${COUNTERS.join(' ')}`, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] })
    const counts: Record<string, number> = {}
    for (const line of out.split('\n')) {
      const [name, value] = line.trim().split(/\s+/)
      if (COUNTERS.includes(name)) counts[name] = Number(value)
    }
    return counts
  } catch {
    return null
  }
}

/** 5,000 connections at once against the listen backlog Node uses by default, and a larger one. */
export async function backlog (): Promise<ScenarioResult> {
  const connections = 5000
  const rows: Array<Array<string | number>> = []
  for (const size of [511, 4096]) {
    const row = await withTarget({ ...base, variant: 'bare', backlog: size }, async (target) => {
      nstat()
      const res = await closedLoop(`${target.origin}/work`, connections, duration)
      const counts = nstat()
      return [size, counts?.TcpExtListenOverflows ?? 'n/a', counts?.TcpExtTCPSynRetrans ?? 'n/a', round(res.okPerS, 0), res.latency.p99, res.latency.max]
    })
    progress(`backlog ${size}: ${row[1]} listen overflows, ${row[2]} SYN retransmits, p99 ${row[4]} ms`)
    rows.push(row)
  }
  const table: Table = {
    title: `Listen backlog under ${connections} new connections (bare Fastify, route waits ${base.serviceTime} ms, ${duration} s; kernel counters for the whole machine, from nstat)`,
    columns: ['backlog', 'listen overflows', 'SYN retransmits', '2xx/s', 'p99 ms', 'max ms'],
    rows
  }
  return { scenario: 'backlog', title: 'Listen backlog', options: { connections, duration }, machine, tables: [table], charts: [], data: rows }
}
