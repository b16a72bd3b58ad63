// runCluster end to end, recycles under load: a primary and its workers in
// child processes, real sockets, undici keep-alive clients. Each worker
// starts through the TypeScript loader, which takes seconds on a busy machine.
import t from 'tap'
import { load, ready, startCluster } from './helpers/cluster.js'
import { Agent, request } from 'undici'
import { sleep } from './helpers/server.js'

t.setTimeout(150_000)

t.test('recycles after maxRequests under keep-alive GET and POST load: replacement first, no request fails', async (t) => {
  const workers = 2
  const cluster = startCluster(t, { workers, maxRequests: 200, maxRequestsJitter: 100, statsInterval: 100, drainTimeout: 10_000, logger: undefined })
  const origin = await ready(cluster)
  const initial = cluster.events[0].stats
  t.equal(initial.serving, workers, 'every worker listens before runCluster resolves')
  for (const worker of initial.workers) {
    t.ok(worker.requestLimit !== null && worker.requestLimit >= 200 && worker.requestLimit <= 300, `limit ${worker.requestLimit} in [200, 300]`)
    t.ok(worker.rssBytes > 0, 'RSS reported')
  }
  const running = load(origin, 8)
  // While the load runs, never fewer than `workers` serve and at most one drains.
  const watching = { on: true }
  const snapshots: Array<{ serving: number, draining: number }> = []
  const watch = (async () => {
    while (watching.on) {
      const stats = await cluster.stats()
      snapshots.push({ serving: stats.serving, draining: stats.workers.filter((w) => w.state === 'draining').length })
      await sleep(50)
    }
  })()
  const recycles = 3
  await cluster.waitFor(() => cluster.events.filter((e) => e.event === 'recycle').length >= recycles, `${recycles} recycles`, 120_000)
  const { ok, failures, pids } = await running.stop()
  watching.on = false
  await watch
  t.same(failures, [], `no request failed (${ok} answered)`)
  t.ok(ok > 0)
  const events = cluster.events.filter((e) => e.event === 'recycle')
  for (const event of events) {
    t.equal(event.reason, 'requests')
    t.ok(event.stats.serving >= workers, `replacement listening before the old worker drains (${event.stats.serving} serving)`)
    t.ok(event.stats.workers.some((w) => w.pid === event.pid && w.state === 'draining'), 'the old worker drains')
  }
  t.ok(pids.size >= workers + 1, `answers came from ${pids.size} processes: the replacements served`)
  t.ok(snapshots.length > 0)
  t.ok(snapshots.every((s) => s.serving >= workers), `never fewer than ${workers} serving (min ${Math.min(...snapshots.map((s) => s.serving))})`)
  t.ok(snapshots.every((s) => s.draining <= 1), 'at most one worker drains at a time')
  const stats = await cluster.stats()
  t.ok(stats.recycles.requests >= recycles, `recycles by reason: ${JSON.stringify(stats.recycles)}`)
  t.equal(stats.recycles.memory, 0)
  t.equal(stats.recycles.crash, 0)
  t.match(cluster.stderr(), /worker \d+ \(pid \d+\) recycled after [\d.]+ s \(\d+ requests\): worker \d+ \(pid \d+\) listens, draining the old one/)
  t.match(cluster.stderr(), /keep-alive timeout of 5000 ms, not 72000 ms/, 'the keep-alive cap is logged')
  // SIGTERM to the primary drains every worker and exits 0.
  process.kill(cluster.child.pid as number, 'SIGTERM')
  t.same(await cluster.exited, { code: 0, signal: null })
  t.match(cluster.stderr(), /SIGTERM: draining \d workers/)
})

t.test('a client that opens a connection per request loses none across recycles', async (t) => {
  // Each recycle ends with the old worker leaving while new connections
  // arrive: one the primary hands it just then must be served elsewhere,
  // not held open unanswered. A race, so this can pass by luck (it failed
  // in two runs of two without the worker waiting for the primary's word);
  // test/cluster-worker.test.ts checks that wait itself.
  const cluster = startCluster(t, { workers: 1, maxRequests: 20, statsInterval: 60_000, drainTimeout: 5000, logger: undefined })
  const origin = await ready(cluster)
  const agent = new Agent({ headersTimeout: 5000, bodyTimeout: 5000 })
  t.teardown(() => agent.destroy())
  const failures: string[] = []
  let ok = 0
  const recycles = 5
  const done = (): boolean => cluster.events.filter((e) => e.event === 'recycle').length >= recycles
  const loop = async (): Promise<void> => {
    while (!done()) {
      try {
        const response = await request(`${origin}/`, { dispatcher: agent, reset: true })
        await response.body.dump()
        if (response.statusCode === 200) ok++
        else failures.push(String(response.statusCode))
      } catch (error) {
        failures.push((error as Error).message)
      }
    }
  }
  await Promise.all(Array.from({ length: 4 }, loop))
  t.same(failures, [], `no request failed (${ok} answered)`)
  t.ok(ok >= recycles * 20, `${ok} answered`)
  // No report is due in a minute (statsInterval): the counts come with the
  // worker's request to be recycled.
  const counts = cluster.events.filter((e) => e.event === 'recycle').map((e) => (e as unknown as { requests: number }).requests)
  t.ok(counts.every((n) => n >= 20), `each recycle event counts the worker's requests: ${counts.join(', ')}`)
})
