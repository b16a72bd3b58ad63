// The bench's hello-world in its smallest form, for counting instructions
// under valgrind: no sampling timers, nothing that runs by the clock, so
// that what is counted over a fixed number of requests is the requests'
// work. Usage: node hello-server.js <variant>; prints "listening <port>".
import Fastify from 'fastify'
import concurrencyLimit from 'fastify-concurrency-limit'

export const helloVariants = ['bare', 'hook', 'plugin', 'adaptive', 'metrics'] as const
export type HelloVariant = typeof helloVariants[number]

const variant = process.argv[2] as HelloVariant
if (!helloVariants.includes(variant)) throw new Error(`unknown variant ${String(variant)}: one of ${helloVariants.join(', ')}`)

const app = Fastify()
// As in the bench: a limit far above the load, so that every request is admitted at once.
if (variant === 'plugin') await app.register(concurrencyLimit, { maxConcurrency: 10_000, maxQueue: 0 })
if (variant === 'adaptive') await app.register(concurrencyLimit, { maxConcurrency: 10_000, maxQueue: 0, adaptive: { initialConcurrency: 1000 } })
if (variant === 'metrics') {
  const { Registry } = await import('prom-client')
  await app.register(concurrencyLimit, { maxConcurrency: 10_000, maxQueue: 0, metrics: { registry: new Registry() } })
}
// The plugin's shape without the plugin: one empty route-level onRequest hook.
const onRequest = variant === 'hook' ? [(_request: unknown, _reply: unknown, done: () => void) => { done() }] : []
app.get('/hello', { onRequest }, async () => 'hello')
await app.listen({ port: 0, host: '127.0.0.1' })
const address = app.server.address()
process.stdout.write(`listening ${typeof address === 'object' && address !== null ? address.port : 0}\n`)
