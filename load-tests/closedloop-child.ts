// One closed loop in a process of its own (see `closedLoopApart`).
import { closedLoop } from './closedloop.js'

const [url, connections, durationS] = JSON.parse(process.argv[2]) as [string, number, number]
const result = await closedLoop(url, connections, durationS)
process.send?.(result, () => process.exit(0))
