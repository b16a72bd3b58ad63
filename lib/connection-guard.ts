import { STATUS_CODES } from 'node:http'
import type { Server } from 'node:net'
import type { Socket } from 'node:net'
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
 * Bounds the open connections of a server. A connection over the bound gets
 * a canned 503 with `Connection: close` written on the socket, before HTTP
 * parsing, instead of the TCP reset that `server.maxConnections` gives.
 * It works by standing in front of node:http's own 'connection' listener.
 */
export class ConnectionGuard {
  readonly maxConnections: number
  open = 0
  peakOpen = 0
  refused = 0
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
