import diagnostics from 'node:diagnostics_channel'
import Fastify from 'fastify'
import { Registry, register } from 'prom-client'
import { expectError, expectType } from 'tsd'
import concurrencyLimit, {
  channels,
  type AdmitMessage,
  type RefuseMessage,
  type RejectReason,
  type RequestConcurrencyLimit
} from 'fastify-concurrency-limit'

const app = Fastify()

// Metrics on a prom-client registry: a new one or the global one.
app.register(concurrencyLimit, { metrics: { registry: new Registry() } })
app.register(concurrencyLimit, { metrics: { registry: register, prefix: 'admin_concurrency_limit_' } })
expectError(app.register(concurrencyLimit, { metrics: {} }))
expectError(app.register(concurrencyLimit, { metrics: { registry: {} } }))
expectError(app.register(concurrencyLimit, { metrics: { registry: new Registry(), prefix: 1 } }))

app.register(concurrencyLimit, { serverTiming: true, logRefusals: 'warn' })
app.register(concurrencyLimit, { logRefusals: false })
expectError(app.register(concurrencyLimit, { serverTiming: 'yes' }))
expectError(app.register(concurrencyLimit, { logRefusals: 'verbose' }))
expectError(app.register(concurrencyLimit, { logRefusals: true }))

// What admitted a request, for logs.
app.addHook('onResponse', async (request) => {
  expectType<RequestConcurrencyLimit | null>(request.concurrencyLimit)
  if (request.concurrencyLimit !== null) {
    expectType<string>(request.concurrencyLimit.pool)
    expectType<number>(request.concurrencyLimit.queuedMs)
  }
})

// Diagnostics channels.
expectType<diagnostics.Channel>(channels.admit)
diagnostics.subscribe('fastify-concurrency-limit:refuse', (message) => {
  const { pool, reason } = message as RefuseMessage
  expectType<string>(pool)
  expectType<RejectReason>(reason)
})
expectType<number>(({} as AdmitMessage).queuedMs)
