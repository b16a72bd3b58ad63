import type { IncomingMessage, Server, ServerResponse } from 'node:http'
import { Server as NetServer, type Socket } from 'node:net'
import { Server as TlsServer } from 'node:tls'

/** What a drain cut short when its time ran out. */
export interface Cut {
  /** Requests accepted and not yet answered in full. */
  inFlight: number
  /** Connections with no request on them: idle keep-alive ones, and TLS ones still in their handshake. */
  idle: number
}

/**
 * Drains HTTP/1 servers without failing a request. It follows
 * gajus/http-terminator, with one change: an idle keep-alive connection is
 * never closed by us while the client may be reusing it. node:http's own
 * `server.close()` resets idle connections at once (nodejs/node #47130): a
 * request the client sent in that instant fails. Instead, once the drain
 * starts:
 * - the servers stop accepting connections (the listening handle is closed,
 *   the open connections are left alone);
 * - every response not yet started, and every one after, carries
 *   `Connection: close`, so each connection ends after its current response
 *   and its client knows not to reuse it;
 * - a connection with no request open ends when its client closes it or when
 *   the server's keep-alive timeout, which the client was told in the
 *   `Keep-Alive: timeout=N` header, runs out; a request that arrives on it
 *   first is served, with `Connection: close`.
 * The drain ends when no connection is left, TLS ones still in their
 * handshake included (a request may follow). HTTP/1 and HTTPS only: an
 * HTTP/2 response cannot carry `Connection: close`.
 */
export class Drainer {
  readonly #servers = new Set<Server>()
  /**
   * Every open TCP connection. Over TLS, from before its handshake: one
   * still in it when the drain starts carries a request yet.
   */
  readonly #connections = new Set<Socket>()
  /** Every connection requests come on (over TLS, once its handshake is done), and its responses not yet finished. */
  readonly #sockets = new Map<Socket, Set<ServerResponse>>()
  readonly #onRequest: () => void
  #draining = false
  #drained: (() => void) | null = null
  #done: Promise<void> | null = null

  /** `onRequest` is called for every request the servers receive. */
  constructor (onRequest: () => void) {
    this.#onRequest = onRequest
  }

  get draining (): boolean {
    return this.#draining
  }

  /** Requests received and not yet answered in full. */
  get inFlight (): number {
    let count = 0
    for (const responses of this.#sockets.values()) count += responses.size
    return count
  }

  /** Tracks a server's connections and requests from now on: call before it listens. */
  track (server: Server): void {
    if (this.#servers.has(server)) return
    this.#servers.add(server)
    const tls = server instanceof TlsServer
    server.prependListener('connection', (socket: Socket) => {
      this.#connections.add(socket)
      if (!tls) this.#sockets.set(socket, new Set())
      socket.once('close', () => {
        this.#connections.delete(socket)
        this.#sockets.delete(socket)
        this.#check()
      })
    })
    // Over TLS, requests come on the TLS socket, after the handshake.
    if (tls) {
      server.prependListener('secureConnection', (socket: Socket) => {
        this.#sockets.set(socket, new Set())
        socket.once('close', () => {
          this.#sockets.delete(socket)
          this.#check()
        })
      })
    }
    server.prependListener('request', (request: IncomingMessage, response: ServerResponse) => {
      const responses = this.#sockets.get(request.socket)
      // Always there: a request comes on a connection seen before it.
      /* c8 ignore next */
      if (responses === undefined) return
      responses.add(response)
      response.once('close', () => { responses.delete(response) })
      if (this.#draining) response.setHeader('connection', 'close')
      // Last: `inFlight` counts this request.
      this.#onRequest()
    })
  }

  /** Starts the drain; resolves once every connection has ended. Called again, the same promise. */
  drain (): Promise<void> {
    if (this.#draining) return this.#done as Promise<void>
    this.#draining = true
    // net.Server's close, not http.Server's: the latter also resets the
    // idle keep-alive connections.
    for (const server of this.#servers) {
      if (server.listening) NetServer.prototype.close.call(server)
    }
    for (const responses of this.#sockets.values()) {
      for (const response of responses) {
        if (!response.headersSent) response.setHeader('connection', 'close')
      }
    }
    this.#done = new Promise<void>((resolve) => { this.#drained = resolve })
    this.#check()
    return this.#done
  }

  /** Ends every connection left at once and says what was cut. */
  cut (): Cut {
    const cut: Cut = { inFlight: 0, idle: 0 }
    for (const [socket, responses] of this.#sockets) {
      if (responses.size > 0) cut.inFlight += responses.size
      else cut.idle++
      socket.destroy()
    }
    // Left: TLS connections still in their handshake (the others went with
    // their TLS socket).
    for (const socket of this.#connections) {
      if (socket.destroyed) continue
      cut.idle++
      socket.destroy()
    }
    return cut
  }

  #check (): void {
    if (this.#draining && this.#connections.size === 0 && this.#sockets.size === 0 && this.#drained !== null) {
      this.#drained()
      this.#drained = null
    }
  }
}
