import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import type { Test } from 'tap'
import { Redis, type RedisOptions } from 'ioredis'

async function freePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number }
      server.close(() => { resolve(port) })
    })
  })
}

/**
 * A redis-server of the test's own: a free port, a temporary directory, no
 * persistence (a restart loses every key, as a crash of a cache would).
 * Stopped when the test ends, whatever happened.
 */
export class RedisServer {
  readonly port: number
  readonly dir: string
  #process: ChildProcess | null = null

  private constructor (port: number, dir: string) {
    this.port = port
    this.dir = dir
  }

  static async start (t: Test): Promise<RedisServer> {
    const server = new RedisServer(await freePort(), mkdtempSync(join(tmpdir(), 'fcl-redis-')))
    t.teardown(async () => {
      await server.stop()
      rmSync(server.dir, { recursive: true, force: true })
    })
    await server.resume()
    return server
  }

  get pid (): number | undefined {
    return this.#process?.pid
  }

  /** Starts the server (again, after `stop`) on the same port. */
  async resume (): Promise<void> {
    const child = spawn('redis-server', [
      '--port', String(this.port), '--bind', '127.0.0.1', '--dir', this.dir,
      '--save', '', '--appendonly', 'no', '--loglevel', 'warning'
    ], { stdio: ['ignore', 'ignore', 'inherit'] })
    this.#process = child
    const probe = new Redis({ port: this.port, host: '127.0.0.1', lazyConnect: true, retryStrategy: () => null, maxRetriesPerRequest: 0 })
    probe.on('error', () => {})
    try {
      for (let i = 0; ; i++) {
        if (child.exitCode !== null) throw new Error(`redis-server exited with ${child.exitCode}`)
        try {
          await probe.connect()
          if (await probe.ping() === 'PONG') return
        } catch (err) {
          if (i > 200) throw err
          probe.disconnect()
          await sleep(25)
        }
      }
    } finally {
      probe.disconnect()
    }
  }

  /** Stops the server and waits until it is gone. */
  async stop (): Promise<void> {
    const child = this.#process
    this.#process = null
    if (child === null || child.exitCode !== null || child.signalCode !== null) return
    const exited = new Promise((resolve) => child.once('exit', resolve))
    child.kill('SIGKILL')
    await exited
  }

  /** Freezes the server (SIGSTOP): connections stay open, nothing is answered. */
  pause (): void {
    this.#process?.kill('SIGSTOP')
  }

  unpause (): void {
    this.#process?.kill('SIGCONT')
  }

  /** A client of the server, disconnected when the test ends. It reconnects at once after a restart. */
  client (t: Test, options: RedisOptions = {}): Redis {
    const redis = new Redis({ port: this.port, host: '127.0.0.1', retryStrategy: () => 20, ...options })
    redis.on('error', () => {})
    t.teardown(() => { redis.disconnect() })
    return redis
  }
}
