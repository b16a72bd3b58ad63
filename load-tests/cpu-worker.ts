// CPU work for the thread-explosion scenario: spins for `ms` milliseconds.
// Used both as a piscina task (default export) and as a one-shot worker
// thread (workerData in, one message out).
import { parentPort, workerData } from 'node:worker_threads'

export default function spin ({ ms }: { ms: number }): number {
  const end = performance.now() + ms
  let n = 0
  while (performance.now() < end) n++
  return n
}

if (parentPort !== null && workerData !== null && typeof workerData === 'object' && 'oneShot' in workerData) {
  parentPort.postMessage(spin(workerData as { ms: number }))
}
