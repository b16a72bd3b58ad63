import t from 'tap'
import { createRequire } from 'node:module'
import Fastify from 'fastify'
import concurrencyLimit from '../lib/index.js'

// This file imports prom-client nowhere but through the plugin.
const require = createRequire(import.meta.url)
const promClientLoaded = (): boolean => Object.keys(require.cache).some((file) => file.includes('/node_modules/prom-client/'))

t.test('prom-client is loaded only when metrics are asked for', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(concurrencyLimit, { maxConcurrency: 5 })
  app.get('/', async () => 'ok')
  t.equal((await app.inject('/')).statusCode, 200)
  t.notOk(promClientLoaded(), 'not loaded without metrics')

  // A registry that keeps what is registered on it, so that nothing but the
  // plugin can be what loads prom-client.
  const registered: Array<{ name: string }> = []
  const registry = {
    registerMetric (metric: object) { registered.push(metric as { name: string }) },
    getSingleMetric: () => undefined,
    removeSingleMetric () {},
    metrics: async () => ''
  }
  const other = Fastify()
  t.teardown(() => other.close())
  await other.register(concurrencyLimit, { metrics: { registry } })
  await other.ready()
  t.ok(promClientLoaded(), 'loaded with metrics')
  t.ok(registered.some((metric) => metric.name === 'fastify_concurrency_limit_in_flight'), 'its metrics registered')
})
