// runCluster end to end: a worker whose RSS passes maxRssMb is replaced,
// and no request fails. A primary and its worker in child processes.
import t from 'tap'
import { Pool } from 'undici'
import { ready, startCluster } from './helpers/cluster.js'

t.setTimeout(150_000)

t.test('recycles once RSS passes maxRssMb', async (t) => {
  // The leak route keeps 8 MiB per request: 400 MiB is passed within 50
  // requests whatever the idle RSS of a worker under the loader.
  const cluster = startCluster(t, { workers: 1, maxRssMb: 400, statsInterval: 50, drainTimeout: 5000, logger: undefined }, { leakBytes: 8 * 1024 * 1024 })
  const origin = await ready(cluster)
  // Bounded waits: a request that hangs across the recycle must fail with
  // a message in `failures`, not time the file out.
  const client = new Pool(origin, { connections: 2, headersTimeout: 20_000, bodyTimeout: 20_000 })
  t.teardown(() => client.destroy())
  const failures: string[] = []
  const pids: number[] = []
  for (let i = 0; i < 200 && !cluster.events.some((e) => e.event === 'recycle'); i++) {
    try {
      const response = await client.request({ method: 'GET', path: '/leak' })
      pids.push((await response.body.json() as { pid: number }).pid)
      if (response.statusCode !== 200) failures.push(String(response.statusCode))
    } catch (error) {
      failures.push((error as Error).message)
    }
  }
  const event = await cluster.waitFor((e) => e.event === 'recycle', 'a recycle')
  t.equal(event.reason, 'memory')
  t.equal(event.pid, pids[0], 'the leaking worker is the one replaced')
  t.ok((event as unknown as { rssBytes: number }).rssBytes > 400 * 1024 * 1024, 'its RSS was over the limit')
  t.equal(event.stats.recycles.memory, 1)
  t.same(failures, [])
  // Served by the replacement now, on a new connection.
  const fresh = new Pool(origin, { headersTimeout: 20_000, bodyTimeout: 20_000 })
  t.teardown(() => fresh.destroy())
  const response = await fresh.request({ method: 'GET', path: '/' })
  t.not((await response.body.json() as { pid: number }).pid, pids[0])
  t.match(cluster.stderr(), /recycled after [\d.]+ s \(RSS [\d.]+ MiB > maxRssMb\)/)
})
