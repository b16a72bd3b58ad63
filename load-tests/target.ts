import { fork, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { fileURLToPath } from 'node:url'
import type { ServerMemory, ServerSettings, ServerStats } from './server.js'

const serverPath = fileURLToPath(new URL('./server.js', import.meta.url))
const rawServerPath = fileURLToPath(new URL('./raw-server.js', import.meta.url))

/** A target server in a child process. */
export class Target {
  readonly child: ChildProcess
  readonly origin: string

  private constructor (child: ChildProcess, port: number) {
    this.child = child
    this.origin = `http://127.0.0.1:${port}`
  }

  static async start (settings: ServerSettings, execArgv: string[] = []): Promise<Target> {
    const child = fork(settings.variant === 'raw' ? rawServerPath : serverPath, [JSON.stringify(settings)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], execArgv: [...process.execArgv, ...execArgv] })
    const [message] = await once(child, 'message') as [{ type: string, port: number }]
    return new Target(child, message.port)
  }

  async #ask<T> (type: string): Promise<T> {
    this.child.send({ type })
    for (;;) {
      const [message] = await once(this.child, 'message') as [{ type: string } & T]
      if (message.type === type) return message
    }
  }

  async reset (): Promise<void> {
    await this.#ask('reset')
  }

  async stats (): Promise<ServerStats> {
    return (await this.#ask<{ stats: ServerStats }>('stats')).stats
  }

  async memory (): Promise<ServerMemory> {
    return (await this.#ask<{ memory: ServerMemory }>('memory')).memory
  }

  async stop (): Promise<void> {
    if (this.child.exitCode !== null) return
    const exited = once(this.child, 'exit')
    this.child.kill('SIGTERM')
    await exited
  }
}
