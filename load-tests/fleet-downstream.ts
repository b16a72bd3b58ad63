// The downstream of the fleet scenario, in its own process: a service that
// every instance calls, counting the calls it serves at once. Each call
// takes argv[2] ms. IPC: 'ready' with the port, then 'stats' and 'reset'.
import { createServer } from 'node:http'

const serviceTime = Number(process.argv[2] ?? '100')
let current = 0
let peak = 0
let calls = 0

const server = createServer((_req, res) => {
  calls++
  if (++current > peak) peak = current
  // The work goes on if the caller is gone (killed): it is still a call.
  setTimeout(() => {
    current--
    res.end('ok')
  }, serviceTime)
})
server.keepAliveTimeout = 30_000

process.on('message', (message: { type: string }) => {
  if (message.type === 'stats') process.send?.({ type: 'stats', current, peak, calls })
  if (message.type === 'reset') {
    peak = current
    calls = 0
    process.send?.({ type: 'reset' })
  }
})
process.on('disconnect', () => { process.exit(0) })

server.listen(0, '127.0.0.1', () => {
  const address = server.address()
  process.send?.({ type: 'ready', port: typeof address === 'object' && address !== null ? address.port : 0 })
})
