// Loaded into the suite's Node processes by bench/cachetests (NODE_OPTIONS=--import): the
// suite's server listens on 127.0.0.1 only (it would bind every interface), and the `.test`
// names the client fetches resolve to 127.0.0.1 (no DNS, no /etc/hosts edit).
import { createRequire } from 'node:module'
const require = createRequire(import.meta.url)
const net = require('node:net')
const dns = require('node:dns')

const listen = net.Server.prototype.listen
net.Server.prototype.listen = function (...args) {
  if ((typeof args[0] === 'number' || /^\d+$/.test(String(args[0]))) &&
      (args.length === 1 || typeof args[1] === 'function')) {
    args.splice(1, 0, '127.0.0.1')
  }
  return listen.apply(this, args)
}

const lookup = dns.lookup
dns.lookup = function (hostname, options, callback) {
  if (typeof options === 'function') { callback = options; options = {} }
  if (typeof options === 'number') options = { family: options }
  if (typeof hostname === 'string' && hostname.endsWith('.test')) {
    const addr = { address: '127.0.0.1', family: 4 }
    return process.nextTick(() => options && options.all ? callback(null, [addr]) : callback(null, addr.address, 4))
  }
  return lookup.call(this, hostname, options, callback)
}
