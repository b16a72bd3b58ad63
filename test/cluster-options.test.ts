// Every option of runCluster is checked before anything is forked.
import t from 'tap'
import { availableParallelism } from 'node:os'
import { runCluster, InvalidOptionError } from '../lib/cluster/index.js'
import { resolveClusterOptions } from '../lib/cluster/options.js'

const factory = async (): Promise<never> => { throw new Error('not called') }

t.test('defaults', async (t) => {
  const resolved = resolveClusterOptions({}, factory)
  t.equal(resolved.workers, availableParallelism())
  t.equal(resolved.maxRequests, Infinity)
  t.equal(resolved.maxRequestsJitter, 0)
  t.equal(resolved.maxRssBytes, Infinity)
  t.equal(resolved.statsInterval, 1000)
  t.equal(resolved.drainTimeout, 30_000)
  t.same(resolved.listen, { port: 3000 })
  const set = resolveClusterOptions({ workers: 3, maxRequests: 10, maxRequestsJitter: 5, maxRssMb: 1.5, statsInterval: 10, drainTimeout: 1, listen: { port: 0, host: '::1' } }, factory)
  t.same({ ...set, logger: null }, { workers: 3, maxRequests: 10, maxRequestsJitter: 5, maxRssBytes: 1.5 * 1024 * 1024, statsInterval: 10, drainTimeout: 1, listen: { port: 0, host: '::1' }, logger: null })
})

t.test('the default logger writes one line to stderr; false is silent; a logger of your own gets the lines', async (t) => {
  const written: string[] = []
  const write = process.stderr.write
  process.stderr.write = ((chunk: string) => { written.push(chunk); return true }) as typeof process.stderr.write
  try {
    const logger = resolveClusterOptions({}, factory).logger
    logger.info('a')
    logger.warn('b')
    logger.error('c')
    const silent = resolveClusterOptions({ logger: false }, factory).logger
    silent.info('x')
    silent.warn('x')
    silent.error('x')
  } finally {
    process.stderr.write = write
  }
  t.same(written, [
    'fastify-concurrency-limit/cluster: a\n',
    'fastify-concurrency-limit/cluster: warning: b\n',
    'fastify-concurrency-limit/cluster: error: c\n'
  ])
  const own = { info: () => {}, warn: () => {}, error: () => {} }
  t.equal(resolveClusterOptions({ logger: own }, factory).logger, own)
})

t.test('invalid options throw FST_CONCURRENCY_LIMIT_INVALID_OPTION, naming the option and the value', async (t) => {
  const cases: Array<[unknown, unknown, RegExp]> = [
    [null, factory, /runCluster: options must be an object, received null/],
    [[], factory, /options must be an object, received \[\]/],
    [{ worker: 2 }, factory, /runCluster: worker is not an option \(expected one of workers, maxRequests/],
    [{}, undefined, /the second argument must be a function that builds and returns the Fastify app, received undefined/],
    [{ workers: 0 }, factory, /workers must be an integer from 1 to 1024, received 0/],
    [{ workers: 1.5 }, factory, /workers must be an integer from 1 to 1024, received 1\.5/],
    [{ workers: '2' }, factory, /workers must be an integer from 1 to 1024, received "2"/],
    [{ maxRequests: 0 }, factory, /maxRequests must be an integer from 1 to/],
    [{ maxRequests: 10, maxRequestsJitter: -1 }, factory, /maxRequestsJitter must be an integer from 0 to/],
    [{ maxRequestsJitter: 100 }, factory, /maxRequestsJitter \(100\) needs maxRequests/],
    [{ maxRssMb: 0 }, factory, /maxRssMb must be a number of MiB > 0, received 0/],
    [{ maxRssMb: Infinity }, factory, /maxRssMb must be a number of MiB > 0, received Infinity/],
    [{ maxRssMb: '512' }, factory, /maxRssMb must be a number of MiB > 0, received "512"/],
    [{ statsInterval: 5 }, factory, /statsInterval must be an integer from 10 to 2147483647, received 5/],
    [{ drainTimeout: 2 ** 31 }, factory, /drainTimeout must be an integer from 1 to 2147483647, received 2147483648/],
    [{ drainTimeout: 0.5 }, factory, /drainTimeout must be an integer/],
    [{ listen: 3000 }, factory, /listen must be an object of app\.listen\(\) options, received 3000/],
    [{ listen: null }, factory, /listen must be an object of app\.listen\(\) options, received null/],
    [{ listen: [] }, factory, /listen must be an object/],
    [{ listen: { port: 70_000 } }, factory, /listen\.port must be an integer from 0 to 65535, received 70000/],
    [{ listen: { port: '80' } }, factory, /listen\.port must be an integer from 0 to 65535, received "80"/],
    [{ logger: console.log }, factory, /logger must be false or an object with info, warn and error functions, received a function/],
    [{ logger: null }, factory, /logger must be false or an object with info, warn and error functions, received null/],
    [{ logger: { info: () => {} } }, factory, /logger must be false or an object/],
    [{ logger: true }, factory, /logger must be false or an object/]
  ]
  for (const [options, fn, message] of cases) {
    await t.rejects(runCluster(options as never, fn as never), { code: 'FST_CONCURRENCY_LIMIT_INVALID_OPTION', message }, String(message))
    t.throws(() => resolveClusterOptions(options, fn), InvalidOptionError)
  }
  const circular: Record<string, unknown> = {}
  circular.self = circular
  t.throws(() => resolveClusterOptions({ listen: { port: circular } }, factory), { message: /received \[object Object\]/ })
  t.throws(() => resolveClusterOptions({ logger: Symbol('x') }, factory), { message: /received Symbol\(x\)/ })
})
