// The primary's bookkeeping, driven in this process with stand-ins for the
// worker processes: every order of events a real cluster makes rare.
import t, { type Test } from 'tap'
import { EventEmitter } from 'node:events'
import type { Worker } from 'node:cluster'
import { TAG, PORT_ENV } from '../lib/cluster/messages.js'
import { resolveClusterOptions, type ClusterOptions } from '../lib/cluster/options.js'
import { Supervisor, type RecycleEvent } from '../lib/cluster/primary.js'
import { sleep } from './helpers/server.js'

let nextId = 1

class FakeWorker extends EventEmitter {
  readonly id = nextId++
  readonly env: Record<string, string>
  readonly sent: unknown[] = []
  readonly signals: string[] = []
  readonly process = {
    pid: 10_000 + this.id,
    kill: (signal: string) => {
      this.signals.push(signal)
      setImmediate(() => this.emit('exit', null, signal))
    }
  }

  constructor (env: Record<string, string>) {
    super()
    this.env = env
  }

  /** False: its channel has closed, as Node's worker.send sees it. */
  connected = true
  send (message: unknown, _handle?: unknown, _options?: unknown, callback?: (error: Error | null) => void): void {
    this.sent.push(message)
    const error = this.connected ? null : new Error('Channel closed')
    // Node's: without a callback, the error is the worker's 'error' event.
    if (callback === undefined) {
      if (error !== null) this.emit('error', error)
    } else callback(error)
  }

  message (body: object): void { this.emit('message', { tag: TAG, ...body }) }
  listen (keepAliveCapped: number | null = null, port = 4321, requestLimit: number | null = null): void {
    // maxRequests unset is Infinity in the worker: null once through IPC.
    this.message({ type: 'listening', address: `127.0.0.1:${port}`, port, requestLimit, keepAliveCapped })
  }

  exit (code: number): void { this.emit('exit', code, null) }
  get drained (): boolean { return this.sent.some((m) => (m as { type: string }).type === 'drain') }
}

interface Harness {
  supervisor: Supervisor
  workers: FakeWorker[]
  logs: string[]
  recycles: RecycleEvent[]
}

function harness (options: ClusterOptions = {}): Harness {
  const logs: string[] = []
  const logger = {
    info: (m: string) => { logs.push(`info: ${m}`) },
    warn: (m: string) => { logs.push(`warn: ${m}`) },
    error: (m: string) => { logs.push(`error: ${m}`) }
  }
  const workers: FakeWorker[] = []
  const supervisor = new Supervisor(resolveClusterOptions({ workers: 2, logger, listen: { port: 0 }, ...options }, () => null), (env) => {
    const worker = new FakeWorker(env)
    workers.push(worker)
    return worker as unknown as Worker
  })
  const recycles: RecycleEvent[] = []
  supervisor.on('recycle', (event: RecycleEvent) => { recycles.push(event) })
  return { supervisor, workers, logs, recycles }
}

async function started (t: Test, options: ClusterOptions = {}): Promise<Harness> {
  const h = harness(options)
  const start = h.supervisor.start()
  t.teardown(async () => {
    for (const worker of h.workers) worker.exit(0)
    await h.supervisor.close()
  })
  for (const worker of h.workers) worker.listen(worker.id % 2 === 0 ? 36_000 : null)
  await start
  return h
}

t.test('recycles one at a time, replacement first, and counts them by reason', async (t) => {
  const h = await started(t)
  const [a, b] = h.workers
  t.equal(h.supervisor.port, 4321)
  t.equal(h.supervisor.address, '127.0.0.1:4321')
  t.equal(h.logs.filter((l) => /keep-alive timeout of 15000 ms, not 36000 ms/.test(l)).length, 1, 'the keep-alive cap is logged once')
  a.emit('message', { type: 'recycle', reason: 'requests' }) // not ours: ignored
  a.emit('message', null)
  t.equal(h.workers.length, 2)
  a.message({ type: 'stats', rss: 5 * 1024 * 1024, requests: 42, inFlight: 1 })
  a.message({ type: 'recycle', reason: 'requests' })
  a.message({ type: 'recycle', reason: 'memory' }) // asked already
  b.message({ type: 'stats', rss: 600 * 1024 * 1024, requests: 7, inFlight: 0 })
  b.message({ type: 'recycle', reason: 'memory' })
  t.equal(h.workers.length, 3, 'one replacement at a time')
  const c = h.workers[2]
  t.same(c.env, {}, 'port 0 is not pinned while a worker serves')
  t.equal(a.drained, false, 'the old worker serves until its replacement listens')
  t.equal(h.supervisor.stats().serving, 2)
  c.listen()
  t.equal(a.drained, true)
  t.same(h.recycles, [{ reason: 'requests', pid: a.process.pid, rssBytes: 5 * 1024 * 1024, requests: 42 }])
  t.match(h.logs.join('\n'), /worker \d+ \(pid \d+\) recycled after [\d.]+ s \(42 requests\)/)
  a.message({ type: 'recycle', reason: 'requests' }) // draining: ignored
  t.equal(h.workers.length, 3, 'the next recycle waits for the old worker to exit')
  const stats = h.supervisor.stats()
  t.same(stats.workers.map((w) => w.state), ['draining', 'serving', 'serving'])
  t.same(stats.workers[0], { id: a.id, pid: a.process.pid, state: 'draining', requests: 42, requestLimit: null, rssBytes: 5 * 1024 * 1024, inFlight: 1, startedAt: stats.workers[0].startedAt })
  t.same(a.sent, [{ tag: TAG, type: 'drain' }], 'drained, not yet told to exit')
  a.message({ type: 'drained' })
  t.same(a.sent, [{ tag: TAG, type: 'drain' }, { tag: TAG, type: 'exit' }], 'its drain done, it is told to exit')
  t.equal(h.workers.length, 3, 'and it is still counted until it does')
  a.exit(0)
  t.equal(h.workers.length, 4, 'then the next one starts')
  h.workers[3].listen()
  t.equal(b.drained, true)
  t.match(h.logs.join('\n'), /recycled after [\d.]+ s \(RSS 600\.0 MiB > maxRssMb\)/)
  b.exit(0)
  t.same(h.supervisor.stats().recycles, { requests: 1, memory: 1, crash: 0 })
  t.equal(h.supervisor.stats().serving, 2)
})

t.test('a worker waiting its turn to be recycled that crashes is replaced once, as a crash', async (t) => {
  const h = await started(t)
  const [a, b] = h.workers
  a.message({ type: 'recycle', reason: 'requests' })
  b.message({ type: 'recycle', reason: 'requests' })
  b.exit(1)
  await sleep(20)
  t.equal(h.workers.length, 4, "a's replacement, b's crash replacement")
  h.workers[2].listen(null, 4321, 1234)
  h.workers[3].listen()
  a.exit(0)
  t.equal(h.workers.length, 4, 'nothing left to recycle')
  t.same(h.supervisor.stats().recycles, { requests: 1, memory: 0, crash: 1 })
  t.same(h.supervisor.stats().workers.map((w) => w.requestLimit), [1234, null])
})

t.test('a replacement that crashes before it listens: the old worker serves on, another replacement starts', async (t) => {
  const h = await started(t)
  const [a] = h.workers
  a.message({ type: 'recycle', reason: 'requests' })
  h.workers[2].exit(1)
  t.match(h.logs.at(-1), /error: worker \d+ \(pid \d+\) exited with code 1 after [\d.]+ s; starting a replacement$/)
  t.equal(a.drained, false)
  await sleep(10)
  t.equal(h.workers.length, 4)
  h.workers[3].listen()
  t.equal(a.drained, true, 'the new replacement takes over')
  t.same(h.supervisor.stats().recycles, { requests: 1, memory: 0, crash: 1 })
})

t.test('a worker that crashes while its replacement starts: the replacement takes its place', async (t) => {
  const h = await started(t)
  const [a, b] = h.workers
  a.message({ type: 'recycle', reason: 'memory' })
  b.message({ type: 'recycle', reason: 'requests' })
  a.emit('exit', null, 'SIGSEGV')
  t.match(h.logs.at(-1), /worker \d+ \(pid \d+\) was killed by SIGSEGV after [\d.]+ s; its replacement is starting/)
  t.equal(h.workers.length, 4, 'no extra worker for the crash; the queued recycle starts')
  h.workers[2].listen()
  t.equal(a.drained, false)
  h.workers[3].listen()
  t.equal(b.drained, true)
  t.same(h.supervisor.stats().recycles, { requests: 1, memory: 0, crash: 1 })
  t.same(h.recycles.map((r) => r.reason), ['crash', 'requests'])
})

t.test('a crash loop backs off, and a worker that lived long resets it', async (t) => {
  const h = await started(t)
  h.workers[0].exit(1)
  t.match(h.logs.at(-1), /starting a replacement$/)
  h.workers[1].exit(1)
  t.match(h.logs.at(-1), /starting a replacement in 500 ms \(crash 2 in a row: backing off\)/)
  await sleep(20)
  t.equal(h.workers.length, 3, 'the first replacement at once')
  h.workers[2].exit(1)
  t.match(h.logs.at(-1), /in 1000 ms \(crash 3 in a row/)
  t.equal(h.supervisor.stats().serving, 0)
  await sleep(700)
  t.equal(h.workers.length, 4, 'the second after 500 ms')
  t.same(h.workers[3].env, { [PORT_ENV]: '4321' }, 'every worker gone: the next one is told the port the first one got')
  h.workers[3].listen()
  const now = Date.now
  Date.now = () => now() + 60_000
  try {
    h.workers[3].exit(1)
  } finally {
    Date.now = now
  }
  t.match(h.logs.at(-1), /after 60\.\d s; starting a replacement$/, 'lived long: not a loop')
  await sleep(20)
  t.same(h.workers[4].env, { [PORT_ENV]: '4321' }, 'pinned from then on')
  t.equal(h.supervisor.stats().recycles.crash, 4)
})

t.test('a drain that outlives drainTimeout: the cut is logged, and the worker killed if it stays', async (t) => {
  const h = await started(t, { drainTimeout: 20 })
  const [a] = h.workers
  a.message({ type: 'recycle', reason: 'requests' })
  h.workers[2].listen()
  a.message({ type: 'cut', cut: { inFlight: 3, idle: 1 } })
  t.match(h.logs.at(-1), /warn: worker \d+ \(pid \d+\) still draining after drainTimeout \(20 ms\): cut 3 requests in flight and 1 idle connection$/)
  a.message({ type: 'cut', cut: { inFlight: 1, idle: 2 } })
  t.match(h.logs.at(-1), /cut 1 request in flight and 2 idle connections$/)
  t.same(h.supervisor.stats().cut, { drains: 2, inFlight: 4, idle: 3 })
  await sleep(2200)
  t.same(a.signals, ['SIGKILL'])
  t.match(h.logs.join('\n'), /did not exit 2000 ms after drainTimeout: killing it/)
  await sleep(10)
  t.equal(h.supervisor.stats().workers.length, 2)
  t.notMatch(h.logs.join('\n'), /while draining/, 'killed by us: no second warning')
})

t.test('a worker gone before its exit is seen: telling it to drain does not end the primary', async (t) => {
  const h = await started(t)
  const [a, b] = h.workers
  a.connected = false
  b.message({ type: 'recycle', reason: 'requests' })
  h.workers[2].listen()
  t.equal(b.drained, true)
  b.connected = false
  b.message({ type: 'drained' })
  t.same(b.sent.map((m) => (m as { type: string }).type), ['drain', 'exit'])
  const closing = h.supervisor.close()
  t.equal(a.drained, true, 'told, and its error ignored')
  for (const worker of h.workers) worker.exit(0)
  await closing
  t.equal(h.supervisor.stats().workers.length, 0)
})

t.test('a replacement killed by a close whose listening was on its way: the old worker is drained once', async (t) => {
  const h = await started(t, { drainTimeout: 20 })
  const [a] = h.workers
  a.message({ type: 'recycle', reason: 'requests' })
  const c = h.workers[2]
  const closing = h.supervisor.close()
  t.same(c.signals, ['SIGKILL'], 'the replacement, starting, is killed')
  c.listen()
  t.same(a.sent.map((m) => (m as { type: string }).type), ['drain'], 'drained by the close only')
  t.equal(h.supervisor.stats().recycles.requests, 0, 'no recycle counted')
  a.exit(0)
  h.workers[1].exit(0)
  await closing
  await sleep(2100)
  t.notMatch(h.logs.join('\n'), /killing it/, 'no kill timer left behind')
})

t.test('a worker that fails while draining is logged', async (t) => {
  const h = await started(t)
  const [a] = h.workers
  a.message({ type: 'recycle', reason: 'requests' })
  h.workers[2].listen()
  a.exit(1)
  t.match(h.logs.at(-1), /warn: worker \d+ \(pid \d+\) exited with code 1 while draining/)
  t.equal(h.supervisor.stats().recycles.crash, 0)
})

t.test('a worker that cannot start stops the cluster', async (t) => {
  const h = harness()
  const start = h.supervisor.start()
  h.workers[0].message({ type: 'failed', error: 'Error: boom\n    at factory' })
  t.match(h.logs.at(-1), /error: worker \d+ \(pid \d+\) failed to start: Error: boom/)
  h.workers[0].exit(1)
  await t.rejects(start, { message: /runCluster: worker \d+ \(pid \d+\) exited with code 1 before it listened: Error: boom$/ })
  t.same(h.workers[1].signals, ['SIGKILL'], 'the others are stopped')
  await h.supervisor.close()
  t.equal(h.supervisor.stats().workers.length, 0)

  const silent = harness()
  const again = silent.supervisor.start()
  silent.workers[0].exit(1)
  await t.rejects(again, { message: /before it listened$/ })
  await silent.supervisor.close()
})

t.test('close drains the serving workers, stops the starting ones, and forgets pending work', async (t) => {
  const listeners = process.listenerCount('SIGTERM')
  const h = await started(t)
  t.equal(process.listenerCount('SIGTERM'), listeners + 1)
  const [a, b] = h.workers
  a.message({ type: 'recycle', reason: 'requests' }) // a replacement starts
  b.exit(1) // a crash: its replacement waits for nothing, then...
  h.workers[3]?.exit(1) // ...crashes too: the next one backs off
  const closed = h.supervisor.close()
  t.equal(h.supervisor.close(), closed, 'one close')
  t.equal(a.drained, true)
  t.same(h.workers[2].signals, ['SIGKILL'], 'a worker still starting is killed')
  b.message({ type: 'recycle', reason: 'requests' })
  const forked = h.workers.length
  await sleep(600)
  t.equal(h.workers.length, forked, 'no replacement after close')
  let done = false
  closed.then(() => { done = true })
  await sleep(10)
  t.equal(done, false, 'waits for the draining worker')
  a.exit(0)
  await closed
  t.equal(process.listenerCount('SIGTERM'), listeners, 'signal handlers removed')
})

t.test('a crash during close is not replaced', async (t) => {
  const h = await started(t)
  const closed = h.supervisor.close()
  h.workers[0].exit(1)
  h.workers[1].exit(0)
  await closed
  t.equal(h.workers.length, 2)
  t.equal(h.supervisor.stats().recycles.crash, 0)
})

t.test('close during the start rejects the start', async (t) => {
  const h = harness()
  const start = h.supervisor.start()
  const closed = h.supervisor.close()
  await t.rejects(start, { message: 'runCluster: closed before every worker listened' })
  await closed
  t.same(h.workers.map((w) => w.signals), [['SIGKILL'], ['SIGKILL']])
})

t.test('SIGTERM and SIGINT drain every worker, then exit 0', async (t) => {
  for (const [signal, workers] of [['SIGTERM', 1], ['SIGINT', 2]] as const) {
    const h = await started(t, { workers })
    const exit = process.exit
    let code: number | undefined
    const exited = new Promise<void>((resolve) => {
      process.exit = ((c?: number) => { code = c; resolve() }) as typeof process.exit
    })
    try {
      process.emit(signal, signal)
      t.match(h.logs.at(-1), new RegExp(`info: ${signal}: draining ${workers} worker${workers === 1 ? '' : 's'}$`))
      for (const worker of h.workers) {
        t.equal(worker.drained, true)
        worker.exit(0)
      }
      await exited
    } finally {
      process.exit = exit
    }
    t.equal(code, 0)
  }
})
