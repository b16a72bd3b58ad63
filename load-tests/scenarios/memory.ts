// What the server keeps alive per connection in each state a client can leave
// it in: an idle keep-alive connection, a request waiting in the queue, and a
// refusal held back by the retry-storm brake. Live memory after a full
// collection (the target runs with --expose-gc), so that garbage does not
// blur the figures; RSS is shown too, though the heap does not give pages back.
import { setTimeout as sleep } from 'node:timers/promises'
import { Agent, request } from 'undici'
import { list, machine, progress, round, settingsBase as base, withTarget } from '../lab.js'
import type { ScenarioResult, Table } from '../report.js'
import type { ServerMemory, ServerSettings } from '../server.js'
import type { Target } from '../target.js'

type State = 'idle' | 'queued' | 'held'
const states: State[] = ['idle', 'queued', 'held']
// The brake holds the n-th repeated refusal 250 ms x 2^(n-1): with this cap
// the sixth wave of refusals stays held for 4 s, time enough to measure.
const rejectDelay = 4000
const heldWaves = 5

/** n requests at once, one per connection of the agent. */
function wave (agent: Agent, url: string, n: number): Array<Promise<void>> {
  return Array.from({ length: n }, async () => {
    const res = await request(url, { dispatcher: agent })
    await res.body.dump()
  })
}

async function until (target: Target, done: (m: ServerMemory) => boolean, timeoutMs: number): Promise<ServerMemory> {
  const end = performance.now() + timeoutMs
  for (;;) {
    const m = await target.memory()
    if (done(m) || performance.now() > end) return m
    await sleep(50)
  }
}

async function measure (target: Target, state: State, n: number): Promise<ServerMemory> {
  const agent = new Agent({ connections: n, pipelining: 1, keepAliveTimeout: 60_000 })
  // A separate connection takes the only slot of the pool under test.
  const holder = new AbortController()
  try {
    if (state === 'idle') {
      await Promise.all(wave(agent, `${target.origin}/hello`, n))
      return await until(target, (m) => m.connections >= n, 2000)
    }
    if (state === 'queued') {
      fetch(`${target.origin}/queued`, { signal: holder.signal }).catch(() => {})
      Promise.allSettled(wave(agent, `${target.origin}/queued`, n))
      return await until(target, (m) => m.queued >= n, 10_000)
    }
    fetch(`${target.origin}/saturate`, { signal: holder.signal }).catch(() => {})
    await sleep(100)
    for (let i = 0; i < heldWaves; i++) await Promise.all(wave(agent, `${target.origin}/rejected`, n))
    Promise.allSettled(wave(agent, `${target.origin}/rejected`, n))
    return await until(target, (m) => m.heldRejections >= n, 2000)
  } finally {
    holder.abort()
    agent.destroy().catch(() => {})
  }
}

export async function memory (): Promise<ScenarioResult> {
  const counts = list('memory-connections')
  const settings: ServerSettings = { ...base, variant: 'plugin', plugin: { rejectDelay } }
  const rows: Array<Record<string, number | string>> = []
  for (const n of counts) {
    for (const state of states) {
      const row = await withTarget(settings, async (target) => {
        const before = await target.memory()
        const after = await measure(target, state, n)
        const live = (m: ServerMemory) => m.heapUsedMB + m.externalMB
        return {
          connections: n,
          state,
          open: after.connections,
          queued: after.queued,
          held: after.heldRejections,
          collected: String(after.collected),
          liveMB: round(live(after) - live(before)),
          liveKiBPerConnection: round((live(after) - live(before)) * 1024 / n),
          rssMB: round(after.rssMB - before.rssMB),
          rssKiBPerConnection: round((after.rssMB - before.rssMB) * 1024 / n)
        }
      }, ['--expose-gc'])
      progress(`memory ${n} connections ${state}: ${row.liveKiBPerConnection} KiB live per connection (open ${row.open}, queued ${row.queued}, held ${row.held})`)
      rows.push(row)
    }
  }
  const table: Table = {
    title: `Server memory per connection, by state (live heap + buffers after a full GC; plugin, rejectDelay ${rejectDelay})`,
    columns: ['connections', 'state', 'open', 'queued', 'held', 'live MB', 'live KiB / connection', 'RSS MB', 'RSS KiB / connection'],
    rows: rows.map((r) => [r.connections, r.state, r.open, r.queued, r.held, r.liveMB, r.liveKiBPerConnection, r.rssMB, r.rssKiBPerConnection])
  }
  return { scenario: 'memory', title: 'Memory per connection: idle, queued, held refusal', options: { counts, rejectDelay }, machine, tables: [table], charts: [], data: rows }
}
