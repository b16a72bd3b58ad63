// A closed loop with autocannon: each connection sends its next request as
// soon as the previous one is answered (a rejected request is retried at once).
import autocannon from 'autocannon'
import { fork } from 'node:child_process'
import { once } from 'node:events'
import { fileURLToPath } from 'node:url'

export interface ClosedLoopResult {
  connections: number
  durationS: number
  total: number
  okPerS: number
  rejectedPerS: number
  errors: number
  timeouts: number
  latency: { p50: number, p99: number, max: number }
}

export async function closedLoop (url: string, connections: number, durationS: number, timeoutS = 10): Promise<ClosedLoopResult> {
  // autocannon's own start is taken before it builds its clients, which
  // takes its loop 50 ms for 100 connections and 0.5-0.75 s for 5,000, in
  // which no connection is opened yet: the load starts once they are built.
  let startedAt = Date.now()
  const result = await new Promise<autocannon.Result>((resolve, reject) => {
    const run = autocannon({ url, connections, duration: durationS, timeout: timeoutS, pipelining: 1 }, (err: Error | null, res) => { if (err !== null && err !== undefined) reject(err); else resolve(res) })
    run.once('start', () => { startedAt = Date.now() })
  })
  const ok = result['2xx']
  const rejected = result.non2xx
  // The run's real length: it ends with the answers still in flight.
  const elapsedS = (result.finish.getTime() - startedAt) / 1000
  return {
    connections,
    durationS: elapsedS,
    total: ok + rejected,
    okPerS: ok / elapsedS,
    rejectedPerS: rejected / elapsedS,
    errors: result.errors,
    timeouts: result.timeouts,
    // autocannon's latency covers every answer, 2xx or not.
    latency: { p50: result.latency.p50, p99: result.latency.p99, max: result.latency.max }
  }
}

const childPath = fileURLToPath(new URL('./closedloop-child.js', import.meta.url))

/**
 * A closed loop from a process of its own: two of them at once load two
 * servers without sharing one generator's event loop, which would hold
 * both to the same rate.
 */
export async function closedLoopApart (url: string, connections: number, durationS: number): Promise<ClosedLoopResult> {
  const child = fork(childPath, [JSON.stringify([url, connections, durationS])], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  const [result] = await once(child, 'message') as [ClosedLoopResult]
  if (child.exitCode === null) await once(child, 'exit')
  return result
}
