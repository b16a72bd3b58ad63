import t, { type Test } from 'tap'
import { readFileSync, rmSync, writeFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import type { FastifyInstance } from 'fastify'
import type { Registry } from 'prom-client'
import { parseExposition } from './helpers/exposition.js'

const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8')
const section = readme.slice(readme.indexOf('## Metrics and logging'), readme.indexOf('\n## ', readme.indexOf('## Metrics and logging') + 1))
const blocks = [...section.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1])
const plugin = fileURLToPath(new URL('../lib/index.js', import.meta.url))

/** Runs a README block as a module (the package name pointed at this checkout); returns its exports. */
async function run<T> (t: Test, source: string, exports: string): Promise<T> {
  const file = fileURLToPath(new URL(`./.metrics-readme-${process.pid}-${Math.random().toString(36).slice(2)}.ts`, import.meta.url))
  writeFileSync(file, source.replace("from 'fastify-concurrency-limit'", `from '${plugin}'`) + `\nexport { ${exports} }\n`)
  t.teardown(() => rmSync(file, { force: true }))
  return await import(file) as T
}

t.test('README\'s metrics example runs as written, and its table lists what is registered', async (t) => {
  t.ok(blocks.length >= 2, 'the section has its ts examples')
  const { app, registry } = await run<{ app: FastifyInstance, registry: Registry }>(t, blocks[0], 'app, registry')
  t.teardown(() => app.close())
  app.get('/work', async () => 'ok')
  t.equal((await app.inject('/work')).statusCode, 200)
  const res = await app.inject('/metrics')
  t.equal(res.statusCode, 200)
  t.match(res.headers['content-type'], /^text\/plain/)
  const exposition = parseExposition(res.body)
  t.equal(exposition.samples.find((s) => s.name === 'fastify_concurrency_limit_requests_total' && s.labels.result === 'admitted')?.value, 1,
    'one admitted; /metrics itself is exempt')
  t.ok(registry.getSingleMetric('fastify_concurrency_limit_in_flight'))

  // Every metric in the table, with its type, and nothing else (with maxConnections, all of them).
  const table = [...section.matchAll(/^\| `(fastify_concurrency_limit_[a-z_]+)` \| (\w+) \|/gm)].map((m) => [m[1], m[2]])
  const { Registry: PromRegistry } = await import('prom-client')
  const { build } = await import('./helpers/server.js')
  const full = new PromRegistry()
  const withConnections = await build(t, { maxConnections: 10, metrics: { registry: full } })
  await withConnections.ready()
  t.same(table.sort(), [...parseExposition(await full.metrics()).types].sort(), 'the table matches the registry')
})

t.test('README\'s log example logs what each request waited', async (t) => {
  const lines: Array<Record<string, unknown>> = []
  const { default: Fastify } = await import('fastify')
  const { Writable } = await import('node:stream')
  const { default: concurrencyLimit } = await import('../lib/index.js')
  const stream = new Writable({
    write (chunk: Buffer, _encoding, callback) {
      lines.push(JSON.parse(chunk.toString()) as Record<string, unknown>)
      callback()
    }
  })
  const app = Fastify({ logger: { level: 'info', stream } })
  t.teardown(() => app.close())
  await app.register(concurrencyLimit)
  const hook = blocks[1].replace(/^\/\/ .*$/m, '')
  // The block adds a hook to `app`: run it against this app.
  const { register } = await run<{ register: (app: FastifyInstance) => void }>(t, `const register = (app: any) => {\n${hook}\n}`, 'register')
  register(app)
  app.get('/', async () => 'ok')
  t.equal((await app.inject('/')).statusCode, 200)
  t.match(lines.find((line) => line.msg === 'served'), { level: 30, pool: 'default', queuedMs: 0, statusCode: 200, reqId: String })
})
