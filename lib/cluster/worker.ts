import type { Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import type { FastifyInstance } from 'fastify'
import { serverBindings } from '../connection-guard.js'
import { InvalidOptionError } from '../errors.js'
import { Drainer } from './drain.js'
import { PORT_ENV, TAG, isMessage, type PrimaryMessage, type WorkerMessage } from './messages.js'
import type { AppFactory, ResolvedClusterOptions } from './options.js'

type Body<T> = T extends unknown ? Omit<T, 'tag'> : never

function send (message: Body<WorkerMessage>): Promise<void> {
  // Were the primary gone already, the callback gets the error: there is no
  // one left to tell.
  return new Promise((resolve) => {
    (process.send as NonNullable<typeof process.send>)({ tag: TAG, ...message }, undefined, {}, () => { resolve() })
  })
}

function describe (error: unknown): string {
  return error instanceof Error ? String(error.stack) : String(error)
}

function isFastify (app: unknown): app is FastifyInstance {
  return app !== null && typeof app === 'object' && typeof (app as FastifyInstance).listen === 'function' &&
    typeof (app as FastifyInstance).close === 'function' && (app as FastifyInstance).server !== undefined
}

/**
 * One worker: builds the app, counts its requests, reports its RSS, listens
 * on the port the workers share, and drains when the primary says so.
 */
export async function runWorker (options: ResolvedClusterOptions, factory: AppFactory): Promise<void> {
  // Ctrl-C and a process manager's SIGTERM often reach the whole process
  // group: the primary drains the workers, each one must not die first.
  const ignore = (): void => {}
  process.on('SIGINT', ignore)
  process.on('SIGTERM', ignore)

  let app: unknown
  try {
    app = await factory()
    if (!isFastify(app)) throw new InvalidOptionError(`runCluster: the factory must return a Fastify instance, not listening; it returned ${typeof app}`)
  } catch (error) {
    await send({ type: 'failed', error: describe(error) })
    process.exit(1)
  }

  const requestLimit = options.maxRequests + Math.floor(Math.random() * (options.maxRequestsJitter + 1))
  let requests = 0
  let askedToRecycle = false
  const recycle = (reason: 'requests' | 'memory'): void => {
    if (askedToRecycle) return
    askedToRecycle = true
    // The primary's log line and recycle event give the counts as of now,
    // not as of a report up to statsInterval old (or none yet).
    if (reason === 'requests') sendStats()
    send({ type: 'recycle', reason })
  }
  const drainer = new Drainer(() => {
    if (++requests >= requestLimit) recycle('requests')
  })

  // The drain waits for idle connections to be closed by their clients,
  // which do so before the keep-alive timeout the server announces: that
  // timeout must end well within the drain's.
  const keepAliveCap = Math.floor(options.drainTimeout / 2)
  let keepAliveCapped: number | null = null
  const prepare = (server: Server): void => {
    drainer.track(server)
    if (server.keepAliveTimeout > keepAliveCap) {
      keepAliveCapped = server.keepAliveTimeout
      server.keepAliveTimeout = keepAliveCap
    }
  }
  prepare(app.server)
  const bindings = serverBindings(app)
  // With host 'localhost' Fastify may listen on more servers than
  // app.server: it keeps them there (see connection-guard.ts).
  if (Array.isArray(bindings)) {
    const push = bindings.push
    Object.defineProperty(bindings, 'push', {
      configurable: true,
      writable: true,
      value: function prepareThenPush (this: Server[], ...servers: Server[]): number {
        for (const server of servers) prepare(server)
        return push.apply(this, servers)
      }
    })
  }

  const sendStats = (): number => {
    const rss = process.memoryUsage.rss()
    send({ type: 'stats', rss, requests, inFlight: drainer.inFlight })
    return rss
  }
  const report = (): void => {
    if (sendStats() > options.maxRssBytes) recycle('memory')
  }
  const timer = setInterval(report, options.statsInterval)
  timer.unref()

  const fastify = app
  let exitCode = 0
  // The app's own messages on the channel are left alone.
  const onMessage = (message: unknown): void => {
    if (!isMessage<PrimaryMessage>(message)) return
    if (message.type === 'exit') {
      // Node's answer to a connection handed back was sent first: once this
      // is written, so is it (a write to a full pipe waits in a queue that
      // process.exit() would drop).
      send({ type: 'exiting' }).then(() => process.exit(exitCode))
      return
    }
    if (drainer.draining) return
    const deadline = setTimeout(() => {
      send({ type: 'cut', cut: drainer.cut() })
    }, options.drainTimeout)
    drainer.drain().then(async () => {
      clearTimeout(deadline)
      clearInterval(timer)
      // The app's own onClose hooks (database pools and the like). One that
      // fails must not end the worker before the primary's word (below):
      // it exits 1 then, and the primary logs it.
      try {
        await fastify.close()
      } catch (error) {
        options.logger.error(`worker (pid ${process.pid}) failed to close its app: ${describe(error)}`)
        exitCode = 1
      }
      // Not gone yet: the primary may have handed this worker a connection
      // before it read that the server had closed. Were the worker to exit
      // with that connection still in the IPC pipe, the primary would keep
      // it open and its client would wait for an answer that never comes
      // (nodejs/node-v0.x-archive#7006). The primary reads the close before
      // this message and answers it with 'exit': every connection handed
      // earlier arrives first, and Node's cluster code hands it back.
      send({ type: 'drained' })
    })
  }
  process.on('message', onMessage)

  try {
    const port = process.env[PORT_ENV]
    await fastify.listen(port === undefined ? options.listen : { ...options.listen, port: Number(port) })
  } catch (error) {
    await send({ type: 'failed', error: describe(error) })
    process.exit(1)
  }
  report()
  // A pipe's address is its path.
  const address = (fastify.addresses() as Array<AddressInfo | string>)
    .map((a) => typeof a === 'string' ? a : `${a.address.replace(/.*:.*/, '[$&]')}:${a.port}`)
    .join(', ')
  const bound = fastify.server.address()
  const port = bound !== null && typeof bound === 'object' ? bound.port : null
  await send({ type: 'listening', address, port, requestLimit, keepAliveCapped })
}
