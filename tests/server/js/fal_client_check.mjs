import { createFalClient } from "@fal-ai/client";
const BASE = process.env.BASE;
const rewrite = (url) => url
  .replace(/^https:\/\/queue\.fal\.run/, `${BASE}/queue`)
  .replace(/^https:\/\/fal\.run/, BASE)
  .replace(/^https:\/\/rest\.fal\.ai/, BASE);
const fal = createFalClient({
  credentials: "anything",
  requestMiddleware: async (req) => ({ ...req, url: rewrite(req.url) }),
});
const APP = "fal-ai/nemotron-diffusion-vlm";
const png = Buffer.from(process.env.PNG_B64, "base64");
const blob = new Blob([png], { type: "image/png" });
const input = { image_url: blob, prompt: "hello", max_tokens: 8, block_length: 4 };
const logs = [];
const res = await fal.subscribe(APP, { input, logs: true, onQueueUpdate: (u) => { if (u.logs) logs.push(...u.logs); } });
console.log("subscribe", JSON.stringify(res.data.output), res.requestId ? "has-id" : "no-id", logs.length);
const streamed = await fal.subscribe(APP, { input: { ...input, image_url: "data:image/png;base64," + process.env.PNG_B64 }, mode: "streaming", logs: true });
console.log("subscribe-streaming", JSON.stringify(streamed.data.output));
const { request_id } = await fal.queue.submit(APP, { input: { ...input, image_url: "data:image/png;base64," + process.env.PNG_B64 } });
const st = await fal.queue.status(APP, { requestId: request_id, logs: true });
console.log("status", st.status);
const url = await fal.storage.upload(blob);
console.log("upload", url.startsWith(BASE));
const run = await fal.run(APP, { input: { ...input, image_url: url } });
console.log("run", JSON.stringify(run.data.output));
const stream = await fal.stream(APP, { input: { ...input, image_url: url } });
for await (const ev of stream) { console.log("event partial=", ev.partial); }
const done = await stream.done();
console.log("stream-done", JSON.stringify(done.output));
try { await fal.run(APP, { input: { image_url: url } }); } catch (e) { console.log("error", e.status, e.constructor.name, JSON.stringify(e.body.detail[0].loc)); }
