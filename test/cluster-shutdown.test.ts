// runCluster end to end: SIGTERM and close() drain the workers; a drain past
// drainTimeout is cut.
import t from 'tap'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Client } from 'undici'
import { ready, startCluster } from './helpers/cluster.js'
import { sleep } from './helpers/server.js'

t.setTimeout(150_000)

t.test('SIGTERM drains: requests queued in the plugin are served, an idle keep-alive connection reused meanwhile too', async (t) => {
  // With host localhost Fastify may listen twice (127.0.0.1 and ::1): both are drained.
  const cluster = startCluster(t, { workers: 1, statsInterval: 50, logger: undefined, listen: { port: 0, host: 'localhost' } }, { slowMs: 700, maxConcurrency: 1, bothLocalhost: true })
  const origin = await ready(cluster)
  t.match(cluster.events[0], { address: /^(127\.0\.0\.1:\d+, \[::1\]:\d+|\[::1\]:\d+, 127\.0\.0\.1:\d+)$/ }, 'listens on both addresses')
  const idle = new Client(origin)
  t.teardown(() => idle.destroy())
  await (await idle.request({ method: 'GET', path: '/' })).body.text()
  const clients = [new Client(origin), new Client(origin), new Client(origin)]
  t.teardown(() => Promise.all(clients.map((c) => c.destroy())))
  const pending = clients.map((client) => client.request({ method: 'GET', path: '/slow' }))
  let stats = await cluster.stats()
  while (stats.workers[0].inFlight < 3) {
    await sleep(50)
    stats = await cluster.stats()
  }
  // One runs, two wait in the queue. SIGTERM to the whole process group, as
  // Ctrl-C or a process manager sends it: the worker ignores it and waits
  // for the primary's word to drain.
  process.kill(-(cluster.child.pid as number), 'SIGTERM')
  await cluster.waitForLog(/SIGTERM: draining 1 worker\n/)
  await sleep(200)
  const reused = await idle.request({ method: 'POST', path: '/', body: '{"late":true}', headers: { 'content-type': 'application/json' } })
  t.equal(reused.statusCode, 200, 'a request on an idle connection during the drain is served')
  t.same((await reused.body.json() as { body: unknown }).body, { late: true })
  t.equal(reused.headers.connection, 'close')
  for (const response of await Promise.all(pending)) {
    t.equal(response.statusCode, 200, 'queued, then served: not 503')
    t.equal(response.headers.connection, 'close')
    await response.body.text()
  }
  t.same(await cluster.exited, { code: 0, signal: null })
})

t.test('a drain past drainTimeout is cut, and the cut is logged', async (t) => {
  const cluster = startCluster(t, { workers: 1, statsInterval: 50, drainTimeout: 500, logger: undefined }, { slowMs: 30_000 })
  const origin = await ready(cluster)
  const client = new Client(origin)
  t.teardown(() => client.destroy())
  const pending = client.request({ method: 'GET', path: '/slow' }).then(() => 'answered', (error: Error) => error.message)
  let stats = await cluster.stats()
  while (stats.workers[0].inFlight < 1) {
    await sleep(50)
    stats = await cluster.stats()
  }
  cluster.send('close')
  const closed = await cluster.waitFor((e) => e.event === 'closed', 'close() to resolve')
  t.same(closed.stats.cut, { drains: 1, inFlight: 1, idle: 0 })
  t.match(cluster.stderr(), /still draining after drainTimeout \(500 ms\): cut 1 request in flight and 0 idle connections/)
  t.match(await pending, /other side closed|socket/i, 'the request cut fails at the client')
  t.same(await cluster.exited, { code: 0, signal: null })
})

t.test('stdout is quiet and the loop ends once closed', async (t) => {
  // On a unix socket: its address is its path.
  const path = join(tmpdir(), `fcl-cluster-${process.pid}.sock`)
  const cluster = startCluster(t, { workers: 1, logger: false, listen: { path } }, {})
  const event = await cluster.waitFor((e) => e.event === 'ready', 'the cluster to listen')
  t.match(event, { port: null, address: path })
  cluster.send('close')
  await cluster.waitFor((e) => e.event === 'closed', 'close() to resolve')
  t.same(await cluster.exited, { code: 0, signal: null }, 'nothing keeps the primary alive after close()')
  t.equal(cluster.stderr(), '', 'logger: false writes nothing')
})
