// `tune` sends real load: by default only to this machine.
import { lookup } from 'node:dns/promises'
import { isIP } from 'node:net'

/** Resolves a host name to every address it has. */
export type Resolve = (host: string) => Promise<string[]>

export const resolveAll: Resolve = async (host) => (await lookup(host, { all: true, verbatim: true })).map((a) => a.address)

/** 127.0.0.0/8, ::1, and IPv4-mapped 127.0.0.0/8. */
export function isLoopbackAddress (address: string): boolean {
  const ip = address.toLowerCase()
  if (isIP(ip) === 4) return ip.startsWith('127.')
  if (ip.startsWith('::ffff:')) return isLoopbackAddress(ip.slice('::ffff:'.length))
  return ip === '::1' || ip === '0:0:0:0:0:0:0:1'
}

/**
 * Why the host of `url` is not loopback, or undefined if it is: an IP
 * literal is read as is, a name must resolve to loopback addresses only.
 */
export async function notLoopback (url: URL, resolve: Resolve): Promise<string | undefined> {
  const host = url.hostname.replace(/^\[(.*)\]$/, '$1')
  let addresses: string[]
  if (isIP(host) !== 0) {
    addresses = [host]
  } else {
    try {
      addresses = await resolve(host)
    } catch (err) {
      return `cannot resolve ${host}: ${(err as Error).message}`
    }
  }
  const outside = addresses.filter((address) => !isLoopbackAddress(address))
  if (addresses.length > 0 && outside.length === 0) return undefined
  return isIP(host) !== 0
    ? `${host} is not a loopback address`
    : `${host} resolves to ${outside.join(', ') || 'no address'}, not a loopback address only`
}
