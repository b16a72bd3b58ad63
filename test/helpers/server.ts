import type { Test } from 'tap'
import Fastify, { type FastifyInstance, type FastifyServerOptions } from 'fastify'
import { Agent, Pool, request as undiciRequest, type Dispatcher } from 'undici'
import { setTimeout as sleep } from 'node:timers/promises'
import type { Http2Stream, ServerHttp2Session } from 'node:http2'
import concurrencyLimit, { type ConcurrencyLimitOptions } from '../../lib/index.js'

export { sleep }

/** A Fastify app with the plugin, closed when the test ends. */
export async function build (
  t: Test,
  options: ConcurrencyLimitOptions = {},
  // Loosely typed: Fastify's types omit some options it passes on to node:http.
  serverOptions: Record<string, unknown> = {}
): Promise<FastifyInstance> {
  // forceCloseConnections: otherwise close() waits out keep-alive sockets.
  const app = Fastify({ forceCloseConnections: true, ...serverOptions } as FastifyServerOptions)
  await app.register(concurrencyLimit, options)
  t.teardown(() => app.close())
  return app
}

/** Listens on an ephemeral loopback port and returns the base URL. */
export async function listen (app: FastifyInstance): Promise<string> {
  await app.listen({ host: '127.0.0.1', port: 0 })
  const address = app.server.address()
  if (address === null || typeof address === 'string') throw new Error('not listening on TCP')
  return `http://127.0.0.1:${address.port}`
}

/** An undici pool with many connections, closed when the test ends. */
export function client (t: Test, origin: string, connections = 256): Pool {
  const pool = new Pool(origin, { connections, pipelining: 1 })
  t.teardown(() => pool.destroy())
  return pool
}

export interface Answer {
  statusCode: number
  headers: Record<string, string | string[] | undefined>
  body: string
}

export async function get (dispatcher: Dispatcher, path: string, opts: Partial<Dispatcher.RequestOptions> = {}): Promise<Answer> {
  const res = await dispatcher.request({ path, method: 'GET', ...opts })
  return { statusCode: res.statusCode, headers: res.headers, body: await res.body.text() }
}

/**
 * Sends a request and aborts it (closing its socket) after `ms`, or once
 * `until` resolves. Resolves when the abort has taken effect on the client.
 */
export async function abortAfter (url: string, opts: { ms?: number, until?: Promise<unknown>, method?: string, body?: string }): Promise<void> {
  const ac = new AbortController()
  // One connection per aborted request: aborting destroys it.
  const agent = new Agent({ connections: 1 })
  const pending = undiciRequest(url, {
    method: (opts.method ?? 'GET') as Dispatcher.HttpMethod,
    body: opts.body,
    headers: opts.body === undefined ? {} : { 'content-type': 'application/json' },
    signal: ac.signal,
    dispatcher: agent
  }).then(async (res) => { await res.body.dump() }, () => {})
  if (opts.until !== undefined) await opts.until
  else await sleep(opts.ms ?? 0)
  ac.abort()
  await pending
  await agent.destroy()
}

/** Polls until `check` returns true, failing after `timeout` ms. */
export async function waitFor (check: () => boolean, timeout = 2000, what = 'condition'): Promise<void> {
  const start = Date.now()
  while (!check()) {
    if (Date.now() - start > timeout) throw new Error(`timed out waiting for ${what}`)
    await sleep(2)
  }
}

/** A gate handlers wait on, and a count of handlers inside it now and at most. */
export class Gauge {
  current = 0
  peak = 0
  started = 0
  #waiters: Array<() => void> = []
  #open = false

  enter (): void {
    this.started++
    this.current++
    if (this.current > this.peak) this.peak = this.current
  }

  leave (): void {
    this.current--
  }

  /** Resolves when the gate opens (at once if it is open). */
  async wait (): Promise<void> {
    if (this.#open) return
    await new Promise<void>((resolve) => this.#waiters.push(resolve))
  }

  open (): void {
    this.#open = true
    for (const resolve of this.#waiters.splice(0)) resolve()
  }

  close (): void {
    this.#open = false
  }
}

/**
 * The HTTP/2 streams of a server still open, and those that Node left
 * closed with their last write unfinished (whose 'close' it never emits).
 */
export function watchStreams (server: { on: (event: 'stream', listener: (stream: Http2Stream) => void) => unknown }): { open: () => number, unfinished: () => number } {
  let open = 0
  let unfinished = 0
  server.on('stream', (stream) => {
    open++
    stream.on('close', () => { open-- })
    stream.on('end', () => { if (stream.closed && !stream.writableFinished) unfinished++ })
  })
  return { open: () => open, unfinished: () => unfinished }
}

/** An HTTP/2 Fastify whose sessions are destroyed before it closes: Node leaves some open. */
export function http2App (t: Test): FastifyInstance {
  const app = Fastify({ http2: true, forceCloseConnections: true }) as unknown as FastifyInstance
  const sessions = new Set<ServerHttp2Session>()
  app.server.on('session', (session: ServerHttp2Session) => { sessions.add(session) })
  t.teardown(async () => {
    for (const session of sessions) session.destroy()
    await app.close()
  })
  return app
}
