import type { FastifyInstance } from 'fastify'
import { STATUS_CODES } from 'node:http'
import type { AddressInfo, Server, Socket } from 'node:net'
import { Server as TlsServer } from 'node:tls'
import { ConnectionLimitError } from './errors.js'

export interface ConnectionStats {
  maxConnections: number
  open: number
  peakOpen: number
  refused: number
}

// A refused socket reads and drops what its client sends for this long, so
// that a request arriving after our answer does not draw a TCP reset that
// would discard the answer before the client reads it.
const LINGER_MS = 1000

/**
 * Bounds the open connections of one or more servers, with one budget: `open`
 * is the sum over them. A connection over the bound gets a canned 503 with
 * `Connection: close` written on the socket, before HTTP parsing, instead of
 * the TCP reset that `server.maxConnections` gives. It works by standing in
 * front of node:http's own 'connection' listener.
 */
export class ConnectionGuard {
  readonly maxConnections: number
  open = 0
  peakOpen = 0
  refused = 0
  readonly #servers = new Set<Server>()
  readonly #lingering = new Set<Socket>()
  readonly #response: string

  constructor (server: Server, maxConnections: number, statusCode: number) {
    this.maxConnections = maxConnections
    const { code, message } = new ConnectionLimitError()
    const body = JSON.stringify({ statusCode, code, error: STATUS_CODES[statusCode], message })
    this.#response = `HTTP/1.1 ${statusCode} ${STATUS_CODES[statusCode] as string}\r\n` +
      'Content-Type: application/json; charset=utf-8\r\n' +
      `Content-Length: ${Buffer.byteLength(body)}\r\n` +
      'Retry-After: 1\r\nConnection: close\r\n\r\n' + body
    this.guard(server)
  }

  /** The servers guarded so far. */
  get servers (): ReadonlySet<Server> {
    return this.#servers
  }

  /**
   * Counts the server's connections against the bound from now on. A
   * connection it accepted before is not seen: guard a server before it
   * listens, or in the tick in which it starts to.
   */
  guard (server: Server): void {
    this.#servers.add(server)
    // Over TLS, HTTP starts after the handshake.
    const event = server instanceof TlsServer ? 'secureConnection' : 'connection'
    const listeners = server.listeners(event) as Array<(this: Server, socket: Socket) => void>
    server.removeAllListeners(event)
    const guard = this
    server.on(event, function guarded (this: Server, socket: Socket) {
      if (guard.open >= guard.maxConnections) {
        guard.#refuse(socket)
        return
      }
      guard.#admit(socket)
      for (const listener of listeners) listener.call(this, socket)
    })
  }

  stats (): ConnectionStats {
    return { maxConnections: this.maxConnections, open: this.open, peakOpen: this.peakOpen, refused: this.refused }
  }

  /** Drops the refused sockets still lingering (the server is closing). */
  close (): void {
    for (const socket of this.#lingering) socket.destroy()
  }

  #admit (socket: Socket): void {
    const open = ++this.open
    if (open > this.peakOpen) this.peakOpen = open
    socket.once('close', () => { this.open-- })
  }

  #refuse (socket: Socket): void {
    this.refused++
    this.#lingering.add(socket)
    socket.on('error', () => {})
    const timer = setTimeout(() => socket.destroy(), LINGER_MS)
    timer.unref()
    socket.once('close', () => {
      clearTimeout(timer)
      this.#lingering.delete(socket)
    })
    socket.resume()
    socket.end(this.#response)
  }
}

// The private field in which Fastify records the servers it listens on
// besides `fastify.server`. Its symbol is not exported.
const BINDINGS = 'fastify.serverBindings'

/**
 * A guard on every server a Fastify instance listens on. With host
 * 'localhost' (the default) Fastify listens with one server per address that
 * localhost resolves to (127.0.0.1, ::1), and `fastify.server` is only the
 * first. The others are created inside listen() and made public nowhere
 * before the onListen hooks, which an earlier async hook can hold back while
 * they already accept connections. So each is guarded as Fastify records it:
 * that happens in its 'listening' callback, which Node emits by nextTick after
 * the listen() system call, before libuv can deliver a first connection.
 * With `serverFactory` Fastify listens on the factory's one server only.
 */
export function guardEveryServer (fastify: FastifyInstance, maxConnections: number, statusCode: number): ConnectionGuard {
  const guard = new ConnectionGuard(fastify.server, maxConnections, statusCode)
  const bindings = serverBindings(fastify)
  if (Array.isArray(bindings)) {
    const push = bindings.push
    // Not enumerable: the array must still look like one to Fastify.
    Object.defineProperty(bindings, 'push', {
      configurable: true,
      writable: true,
      value: function guardThenPush (this: Server[], ...servers: Server[]): number {
        for (const server of servers) guard.guard(server)
        return push.apply(this, servers)
      }
    })
  }
  // A Fastify that keeps its servers elsewhere must not leave some unbounded
  // in silence.
  fastify.addHook('onListen', (done) => {
    const guarded = new Set([...guard.servers].map((server) => JSON.stringify(server.address())))
    // Only fastify.server can listen on a pipe, and it is guarded: the rest are TCP.
    const unguarded = (fastify.addresses() as AddressInfo[])
      .filter((address) => !guarded.has(JSON.stringify(address)))
      .map(({ address, port }) => `${address.replace(/.*:.*/, '[$&]')}:${port}`)
    if (unguarded.length > 0) {
      fastify.log.warn(`fastify-concurrency-limit: maxConnections (${maxConnections}) does not bound the connections to ` +
        `${unguarded.join(', ')}: Fastify listens there on servers this plugin cannot find in this version of Fastify. ` +
        'Listen on a single address (e.g. host: \'127.0.0.1\') to keep the bound.')
    }
    done()
  })
  return guard
}

export function serverBindings (fastify: object): unknown {
  // A child context inherits the field from the root through its prototype.
  for (let object: object | null = fastify; object !== null; object = Object.getPrototypeOf(object)) {
    const symbol = Object.getOwnPropertySymbols(object).find((s) => s.description === BINDINGS)
    if (symbol !== undefined) return (object as Record<symbol, unknown>)[symbol]
  }
  return undefined
}
