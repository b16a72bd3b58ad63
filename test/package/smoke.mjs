// Loads the built package by its own name, from ESM and from CommonJS, and
// serves one request through it: what a user gets from `npm install`.
import { createRequire } from 'node:module'
import assert from 'node:assert/strict'
import Fastify from 'fastify'
import esmDefault, { fastifyConcurrencyLimit, QueueFullError } from 'fastify-concurrency-limit'

const require = createRequire(import.meta.url)
const cjs = require('fastify-concurrency-limit')

assert.equal(typeof esmDefault, 'function')
assert.equal(esmDefault, fastifyConcurrencyLimit)
assert.equal(cjs.default, esmDefault)
assert.equal(cjs.fastifyConcurrencyLimit, esmDefault)
assert.equal(new QueueFullError().code, 'FST_CONCURRENCY_LIMIT_QUEUE_FULL')

for (const plugin of [esmDefault, cjs, cjs.default]) {
  const app = Fastify()
  await app.register(plugin, { maxConcurrency: 1 })
  app.get('/', async () => 'ok')
  const res = await app.inject('/')
  assert.equal(res.body, 'ok')
  assert.equal(app.concurrencyLimit.stats().completed, 1)
  await app.close()
}
// The cluster entry: its own subpath, from import and require; it checks
// its options before forking anything.
const { runCluster } = await import('fastify-concurrency-limit/cluster')
assert.equal(typeof runCluster, 'function')
assert.equal(require('fastify-concurrency-limit/cluster').runCluster, runCluster)
await assert.rejects(runCluster({ workers: 0 }, async () => Fastify()), { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION' })
console.log('package smoke test: import, require and register all work; the cluster entry loads')
