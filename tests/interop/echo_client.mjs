// Runs the echo scenarios against a server with Node's `ws` client and prints one JSON line of results.
// Usage: node echo_client.mjs ws://127.0.0.1:PORT/
import WebSocket from "ws";

const url = process.argv[2];
const ws = new WebSocket(url, { perMessageDeflate: true });
const results = { extensions: null, replies: [], closeCode: null };
const big = Buffer.alloc(100000, 7);
const outgoing = ["hello", "héllo ☃", big, ...Array.from({ length: 20 }, (_, i) => `n${i}`)];
const timer = setTimeout(() => { console.log(JSON.stringify({ error: "timeout", ...results })); process.exit(2); }, 15000);

ws.on("open", () => {
  results.extensions = ws.extensions;
  for (const message of outgoing) ws.send(message);
});
ws.on("message", (data, isBinary) => {
  results.replies.push(isBinary ? { binary: data.length, sum: data.reduce((a, b) => a + b, 0) } : data.toString());
  if (results.replies.length === outgoing.length) ws.close(1000, "done");
});
ws.on("close", (code) => {
  results.closeCode = code;
  clearTimeout(timer);
  console.log(JSON.stringify(results));
});
ws.on("error", (error) => { console.log(JSON.stringify({ error: String(error), ...results })); process.exit(1); });
