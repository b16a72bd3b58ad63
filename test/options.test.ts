import t from 'tap'
import Fastify from 'fastify'
import concurrencyLimit, { InvalidOptionError } from '../lib/index.js'

const code = 'FST_CONCURRENCY_LIMIT_INVALID_OPTION'

async function registerWith (options: unknown): Promise<unknown> {
  const app = Fastify()
  try {
    await app.register(concurrencyLimit, options as never)
    await app.ready()
    return null
  } catch (err) {
    return err
  } finally {
    await app.close()
  }
}

const invalid: Array<[string, unknown, RegExp]> = [
  ['maxConcurrency 0', { maxConcurrency: 0 }, /maxConcurrency must be an integer >= 1, received 0$/],
  ['maxConcurrency negative', { maxConcurrency: -5 }, /maxConcurrency must be an integer >= 1, received -5$/],
  ['maxConcurrency fraction', { maxConcurrency: 1.5 }, /maxConcurrency must be an integer >= 1, received 1.5$/],
  ['maxConcurrency NaN', { maxConcurrency: NaN }, /maxConcurrency must be an integer >= 1, received NaN$/],
  ['maxConcurrency Infinity', { maxConcurrency: Infinity }, /maxConcurrency must be an integer >= 1, received Infinity$/],
  ['maxConcurrency string', { maxConcurrency: '10' }, /maxConcurrency must be an integer >= 1, received "10"$/],
  ['maxConcurrency null', { maxConcurrency: null }, /maxConcurrency must be an integer >= 1, received null$/],
  ['maxQueue negative', { maxQueue: -1 }, /maxQueue must be an integer >= 0, received -1$/],
  ['maxQueue fraction', { maxQueue: 0.5 }, /maxQueue must be an integer >= 0, received 0.5$/],
  ['maxQueue string', { maxQueue: 'lots' }, /maxQueue must be an integer >= 0, received "lots"$/],
  ['queueTimeout negative', { queueTimeout: -1 }, /queueTimeout must be an integer number of milliseconds from 0 to 2147483647, received -1$/],
  ['queueTimeout in seconds, a fraction', { queueTimeout: 0.5 }, /queueTimeout must be an integer number of milliseconds from 0 to 2147483647, received 0.5$/],
  ['queueTimeout fraction of a millisecond', { queueTimeout: 1500.5 }, /queueTimeout must be an integer number of milliseconds .*, received 1500.5$/],
  ['queueTimeout NaN', { queueTimeout: NaN }, /queueTimeout must be .*, received NaN$/],
  ['queueTimeout too long', { queueTimeout: 2 ** 31 }, /queueTimeout must be .*, received 2147483648$/],
  ['queueTimeout string', { queueTimeout: '1s' }, /queueTimeout must be .*, received "1s"$/],
  ['global string', { global: 'yes' }, /global must be a boolean, received "yes"$/],
  ['hook unknown', { hook: 'onSend' }, /hook must be one of onRequest, preParsing, preValidation, preHandler, received "onSend"$/],
  ['statusCode 200', { statusCode: 200 }, /statusCode must be a known 4xx or 5xx status code .*, received 200$/],
  ['statusCode unknown', { statusCode: 599 }, /statusCode must be .*, received 599$/],
  ['statusCode string', { statusCode: '503' }, /statusCode must be .*, received "503"$/],
  ['retryAfter negative', { retryAfter: -1 }, /retryAfter must be a number of seconds from 0 to 2147483647 or a function, received -1$/],
  ['retryAfter past delta-seconds', { retryAfter: 1e21 }, /retryAfter must be a number of seconds from 0 to 2147483647 or a function, received 1e\+21$/],
  ['retryAfter 2^31', { retryAfter: 2 ** 31 }, /retryAfter must be .*, received 2147483648$/],
  ['retryAfter NaN', { retryAfter: NaN }, /retryAfter must be .*, received NaN$/],
  ['retryAfter Infinity', { retryAfter: Infinity }, /retryAfter must be .*, received Infinity$/],
  ['retryAfter string', { retryAfter: '5' }, /retryAfter must be .*, received "5"$/],
  ['errorResponseBuilder object', { errorResponseBuilder: {} }, /errorResponseBuilder must be a function, received \{\}$/],
  ['unknown key', { maxConcurency: 10 }, /maxConcurency is not an option \(expected one of maxConcurrency, maxQueue, queueTimeout, maxEventLoopDelay, adaptive, store, priority, global, hook, exempt, statusCode, retryAfter, errorResponseBuilder, groups, rejectDelay, maxHeldRejections, closeOnReject, maxConnections, metrics, serverTiming, logRefusals\)$/],
  ['rejectDelay negative', { rejectDelay: -1 }, /rejectDelay must be an integer number of milliseconds from 0 to 2147483647, received -1$/],
  ['rejectDelay in seconds, a fraction', { rejectDelay: 0.25 }, /rejectDelay must be an integer number of milliseconds from 0 to 2147483647, received 0.25$/],
  ['rejectDelay too long', { rejectDelay: 2 ** 31 }, /rejectDelay must be .*, received 2147483648$/],
  ['rejectDelay string', { rejectDelay: '1s' }, /rejectDelay must be .*, received "1s"$/],
  ['maxHeldRejections fraction', { maxHeldRejections: 1.5 }, /maxHeldRejections must be an integer >= 0, received 1.5$/],
  ['closeOnReject string', { closeOnReject: 'yes' }, /closeOnReject must be a boolean, received "yes"$/],
  ['maxConnections 0', { maxConnections: 0 }, /maxConnections must be an integer >= 1, received 0$/],
  ['maxConnections string', { maxConnections: '100' }, /maxConnections must be an integer >= 1, received "100"$/],
  ['options array', [1], /the options must be an object, received \[1\]$/],
  ['options class instance', new Date(0), /the options must be an object, received "1970-01-01T00:00:00.000Z"$/],
  ['groups array', { groups: [] }, /groups must be an object of pool settings by name, received \[\]$/],
  ['group not object', { groups: { a: 5 } }, /groups.a must be an object, received 5$/],
  ['group bad value', { groups: { a: { maxConcurrency: 0 } } }, /groups.a.maxConcurrency must be an integer >= 1, received 0$/],
  ['group queueTimeout fraction', { groups: { a: { queueTimeout: 2.5 } } }, /groups.a.queueTimeout must be an integer number of milliseconds from 0 to 2147483647, received 2.5$/],
  ['group unknown key', { groups: { a: { hook: 'onRequest' } } }, /groups.a.hook is not an option \(expected one of maxConcurrency, maxQueue, queueTimeout, maxEventLoopDelay, adaptive, store, priority\)$/],
  ['group named default', { groups: { default: { maxConcurrency: 1 } } }, /groups.default is the plugin's own pool: set its options at the top level$/]
]

for (const [name, options, message] of invalid) {
  t.test(`invalid option: ${name}`, async (t) => {
    const err = await registerWith(options)
    t.type(err, InvalidOptionError)
    t.type(err, TypeError)
    t.match(err, { code, message })
  })
}

t.test('a value that cannot be shown as JSON is still named', async (t) => {
  const circular: Record<string, unknown> = {}
  circular.self = circular
  t.match(await registerWith({ maxQueue: circular }), { code, message: /maxQueue must be an integer >= 0, received \[object Object\]$/ })
  t.match(await registerWith({ maxQueue: 10n }), { code, message: /received 10$/ })
  t.match(await registerWith({ maxQueue: () => 1 }), { code, message: /received a function$/ })
  t.match(await registerWith({ maxQueue: Symbol('s') }), { code, message: /received Symbol\(s\)$/ })
})

t.test('valid options, including the edges', async (t) => {
  t.equal(await registerWith(undefined), null)
  t.equal(await registerWith({}), null)
  t.equal(await registerWith(Object.create(null)), null)
  t.equal(await registerWith({ maxConcurrency: 1, maxQueue: 0, queueTimeout: 0, statusCode: 429, retryAfter: 0, global: false, hook: 'preHandler' }), null)
  t.equal(await registerWith({ rejectDelay: 0, maxHeldRejections: 0, closeOnReject: true }), null)
  t.equal(await registerWith({ queueTimeout: 2 ** 31 - 1, retryAfter: () => 1, errorResponseBuilder: () => ({}), groups: { a: {}, b: { maxQueue: 3 } } }), null)
})

const invalidRoute: Array<[string, unknown, RegExp]> = [
  ['a number', 5, /route GET \/r: config.concurrencyLimit must be an object, true or false, received 5$/],
  ['a string', 'on', /config.concurrencyLimit must be an object, true or false, received "on"$/],
  ['null', null, /config.concurrencyLimit must be an object, true or false, received null$/],
  ['maxConcurrency 0', { maxConcurrency: 0 }, /route GET \/r: config.concurrencyLimit.maxConcurrency must be an integer >= 1, received 0$/],
  ['maxQueue -1', { maxQueue: -1 }, /config.concurrencyLimit.maxQueue must be an integer >= 0, received -1$/],
  ['queueTimeout string', { queueTimeout: '100' }, /config.concurrencyLimit.queueTimeout must be .*, received "100"$/],
  ['queueTimeout fraction', { queueTimeout: 0.5 }, /route GET \/r: config.concurrencyLimit.queueTimeout must be an integer number of milliseconds from 0 to 2147483647, received 0.5$/],
  ['group empty', { group: '' }, /config.concurrencyLimit.group must be a non-empty string, received ""$/],
  ['group number', { group: 1 }, /config.concurrencyLimit.group must be a non-empty string, received 1$/],
  ['hook unknown', { hook: 'onResponse' }, /config.concurrencyLimit.hook must be one of .*, received "onResponse"$/],
  ['unknown key', { limit: 3 }, /route GET \/r: config.concurrencyLimit.limit is not an option \(expected one of maxConcurrency, maxQueue, queueTimeout, maxEventLoopDelay, adaptive, store, priority, group, hook\)$/]
]

for (const [name, config, message] of invalidRoute) {
  t.test(`invalid route config: ${name}`, async (t) => {
    const app = Fastify()
    t.teardown(() => app.close())
    await app.register(concurrencyLimit)
    t.throws(() => app.get('/r', { config: { concurrencyLimit: config as never } }, async () => 'x'), { code, message })
  })
}
