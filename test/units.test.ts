import t from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import { Writable } from 'node:stream'
import concurrencyLimit, { type ConcurrencyLimitOptions } from '../lib/index.js'
import { resolveRouteConfig } from '../lib/options.js'

// A Fastify app whose log lines (warn and above) are kept for the test.
async function logged (options: ConcurrencyLimitOptions, routes = (app: FastifyInstance): void => { app.get('/', async () => 'x') }) {
  const lines: Array<{ level: number, msg: string }> = []
  const stream = new Writable({
    write (chunk: Buffer, _encoding, callback) {
      for (const line of chunk.toString().split('\n')) if (line !== '') lines.push(JSON.parse(line))
      callback()
    }
  })
  const app = Fastify({ logger: { level: 'warn', stream } })
  await app.register(concurrencyLimit, options)
  routes(app)
  await app.ready()
  return { app, lines }
}

t.test('a duration under 100 ms is logged once as a warning that names the unit', async (t) => {
  const { app, lines } = await logged({ queueTimeout: 30, rejectDelay: 1, groups: { fast: { queueTimeout: 5 }, off: { queueTimeout: 0 }, fine: { queueTimeout: 100 } } })
  t.teardown(() => app.close())
  for (let i = 0; i < 3; i++) await app.inject('/')
  t.same(lines.map((line) => line.msg), [
    'queueTimeout is in milliseconds: 30 ms is shorter than most queue waits; for 30 seconds write 30000',
    'rejectDelay is in milliseconds: 1 ms is too short to slow a retry storm; for 1 second write 1000',
    'groups.fast.queueTimeout is in milliseconds: 5 ms is shorter than most queue waits; for 5 seconds write 5000'
  ], 'one line per option, at registration, none per request')
  t.ok(lines.every((line) => line.level === 40), 'at level warn')
})

t.test('0, 100 and longer, and the defaults log nothing', async (t) => {
  for (const options of [{}, { queueTimeout: 0, rejectDelay: 0 }, { queueTimeout: 100, rejectDelay: 99_000, groups: { a: { queueTimeout: 0 } } }]) {
    const { app, lines } = await logged(options)
    await app.close()
    t.same(lines, [], JSON.stringify(options))
  }
})

t.test('the longest durations are valid', async (t) => {
  const { app, lines } = await logged({ queueTimeout: 2 ** 31 - 1, rejectDelay: 2 ** 31 - 1, retryAfter: 2 ** 31 - 1 })
  await app.close()
  t.same(lines, [])
})

t.test('a route config under 100 ms carries its warning, once per config object', async (t) => {
  const config = { queueTimeout: 30 }
  t.same(resolveRouteConfig('GET /r', config, true)?.warnings, [
    'route GET /r: config.concurrencyLimit.queueTimeout is in milliseconds: 30 ms is shorter than most queue waits; for 30 seconds write 30000'
  ])
  t.same(resolveRouteConfig('HEAD /r', config, true)?.warnings, [], 'the HEAD route Fastify adds shares the config: no second warning')
  t.same(resolveRouteConfig('GET /s', { queueTimeout: 0, maxConcurrency: 2 }, true)?.warnings, [])
  t.same(resolveRouteConfig('GET /t', { group: 'g' }, true)?.warnings, [])
  t.same(resolveRouteConfig('GET /u', true, true)?.warnings, [])
  t.same(resolveRouteConfig('GET /v', undefined, true)?.warnings, [])
})

t.test('a route config under 100 ms is logged once at registration', async (t) => {
  const { app, lines } = await logged({}, (app) => {
    app.get('/r', { config: { concurrencyLimit: { queueTimeout: 30 } } }, async () => 'x')
  })
  t.teardown(() => app.close())
  t.same(lines.map((line) => line.msg), [
    'route GET /r: config.concurrencyLimit.queueTimeout is in milliseconds: 30 ms is shorter than most queue waits; for 30 seconds write 30000'
  ], 'GET and its HEAD twin: one line')
})
