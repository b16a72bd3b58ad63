// runCluster end to end: crashes, and workers that cannot start.
import t from 'tap'
import { createServer, type AddressInfo } from 'node:net'
import { Client } from 'undici'
import { ready, startCluster } from './helpers/cluster.js'
import { sleep } from './helpers/server.js'

t.setTimeout(150_000)

t.test('a crashed worker is replaced, on the same port; a crash loop backs off', async (t) => {
  // One worker: a crash leaves none, and the primary's listening handle goes
  // with it. The replacement must listen on the port the first one got.
  const cluster = startCluster(t, { workers: 1, statsInterval: 100, logger: undefined })
  const origin = await ready(cluster)
  const crash = async (): Promise<number> => {
    const client = new Client(origin)
    const response = await client.request({ method: 'GET', path: '/crash' })
    const { pid } = await response.body.json() as { pid: number }
    await client.destroy()
    return pid
  }
  const serving = async (than: number): Promise<number> => {
    for (;;) {
      const stats = await cluster.stats()
      if (stats.serving === 1 && stats.workers[0].pid !== than) return stats.workers[0].pid
      await sleep(100)
    }
  }
  const first = await crash()
  await cluster.waitForLog(/worker \d+ \(pid \d+\) exited with code 1 after [\d.]+ s; starting a replacement\n/)
  const second = await serving(first)
  t.equal(await crash(), second, 'the replacement serves on the same port')
  await cluster.waitForLog(/starting a replacement in 500 ms \(crash 2 in a row: backing off\)/)
  const third = await serving(second)
  const stats = await cluster.stats()
  t.same(stats.recycles, { requests: 0, memory: 0, crash: 2 })
  t.equal(cluster.events.filter((e) => e.event === 'recycle' && e.reason === 'crash').length, 2, "a 'recycle' event for each")
  // On a connection closed at once: an idle keep-alive connection would hold
  // the drain at the end of the test until the client drops it.
  const client = new Client(origin)
  const response = await (await client.request({ method: 'GET', path: '/' })).body.json() as { pid: number }
  await client.close()
  t.equal(response.pid, third)
})

t.test('a worker that cannot start stops the cluster with the reason', async (t) => {
  // The port is taken.
  const taken = createServer()
  await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve))
  t.teardown(() => taken.close())
  const { port } = taken.address() as AddressInfo
  // Each cluster on its own: they start at once, and most of the wait is
  // for processes to load.
  const clusters = ([
    [{ failStart: 'error' }, /failed to start: Error: the factory failed on purpose\n {4}at /],
    [{ failStart: 'string' }, /failed to start: a string thrown on purpose\n/],
    [{ notAnApp: true }, /the factory must return a Fastify instance, not listening; it returned object/]
  ] as const).map(([app, reason]) => ({ cluster: startCluster(t, { workers: 2, logger: undefined }, app), reason }))
  const busy = startCluster(t, { workers: 1, listen: { port, host: '127.0.0.1' }, logger: undefined })
  for (const { cluster, reason } of clusters) {
    const { code } = await cluster.exited
    t.equal(code, 1, 'the primary fails')
    t.match(cluster.stderr(), /runCluster: worker \d+ \(pid \d+\) exited with code 1 before it listened/)
    t.match(cluster.stderr(), reason)
  }
  t.equal((await busy.exited).code, 1)
  t.match(busy.stderr(), /failed to start: Error: \w+ EADDRINUSE/)
})
