// Read the graph that graphcache cached for one root, straight from Redis (wire format 2).
//
//   node read-graph.mjs REDIS_URL NAMESPACE ROOT_ID
//
// Prints one JSON line: {"root_id", "version", "nodes"}, the version as a decimal string (a 64-bit
// integer: JavaScript numbers lose precision above 2**53, so it is parsed as a BigInt), or
// {"root_id", "miss": true} when the cache holds no graph for the root. Exit 2 on bad arguments.
import { createClient, commandOptions } from "redis";
import { Decoder } from "@msgpack/msgpack";

const [url, namespace, rootId] = process.argv.slice(2);
if (!url || !namespace || !rootId) {
  console.error("usage: node read-graph.mjs REDIS_URL NAMESPACE ROOT_ID");
  process.exit(2);
}

// A root's graph lives under the cache key "graph:<root_id>"; its Redis key is the namespace, the key's
// UTF-8 bytes in base64url without padding as the hash tag, and "e" (the entry hash).
const tag = Buffer.from(`graph:${rootId}`, "utf8").toString("base64url");
const entry = `${namespace}:{${tag}}:e`;

const client = createClient({ url });
client.on("error", (err) => {
  console.error(`redis: ${err.message}`);
  process.exit(1);
});
await client.connect();
try {
  // Values are raw msgpack bytes: ask for Buffers, never strings.
  const [v, d] = await client.hmGet(commandOptions({ returnBuffers: true }), entry, ["v", "d"]);
  if (v === null || d === null) {
    console.log(JSON.stringify({ root_id: rootId, miss: true }));
  } else {
    const version = BigInt(v.toString("ascii"));
    const graph = new Decoder({ useBigInt64: true }).decode(d);
    // A well-formed entry's graph names its own root and version; anything else is to be treated as a miss.
    if (graph.root_id !== rootId || BigInt(graph.version) !== version) {
      console.log(JSON.stringify({ root_id: rootId, miss: true, malformed: true }));
    } else {
      const nodes = Object.keys(graph.nodes).sort();
      console.log(JSON.stringify({ root_id: rootId, version: version.toString(), nodes }));
    }
  }
} finally {
  await client.quit();
}
