// A hotslot client in Node.js: Generate, GenerateStream, and the google.rpc error details (ErrorInfo, BadRequest,
// RetryInfo) of a failed call, with @grpc/grpc-js and @grpc/proto-loader loading the .proto files at run time.
// README.md ("Clients") shows it; tests/integration/test_node_client.py runs it against a real cluster.
//
//   node clients/node/hotslot_client.mjs ROUTER_ADDRESS MODEL_ID
//
// Prints one JSON object per line: {"call": "Generate", ...}, {"call": "GenerateStream", ...}, {"call": "error", ...}.
import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const PROTOS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../protos");

// keepCase: fields are written as in the .proto (model_id, guidance_scale); enums as their names; int64 as strings.
const definition = protoLoader.loadSync("hotslot/router/v1/router_service.proto", {
  includeDirs: [PROTOS], keepCase: true, enums: String, longs: String, defaults: true, oneofs: true,
});
const { RouterService } = grpc.loadPackageDefinition(definition).hotslot.router.v1;

// The error details are google.rpc messages packed in a google.rpc.Status, sent as the `grpc-status-details-bin`
// trailer; protos/google/rpc/ has their .proto files.
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (origin, target) => path.join(PROTOS, target);
rpcTypes.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
const Status = rpcTypes.lookupType("google.rpc.Status");

/** The google.rpc details of a failed call, by type name (ErrorInfo, BadRequest, RetryInfo, ...). */
export function errorDetails(error) {
  const [raw] = error.metadata?.get("grpc-status-details-bin") ?? [];
  if (!raw) return {};
  const details = {};
  for (const any of Status.decode(raw).details) {
    const name = any.type_url.split("/").pop(); // type.googleapis.com/google.rpc.ErrorInfo
    const type = rpcTypes.lookupType(name);
    details[name.replace("google.rpc.", "")] = type.toObject(type.decode(any.value), { longs: String });
  }
  return details;
}

function call(client, method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, { deadline: Date.now() + 300_000 }, (error, reply) => (error ? reject(error) : resolve(reply))));
}

async function main() {
  const [address, modelId] = process.argv.slice(2);
  const router = new RouterService(address, grpc.credentials.createInsecure());

  // Generate: requests are flat; unset optional fields (seed, guidance_scale) mean "random" and "the default".
  const reply = await call(router, "Generate", {
    model: { model_id: modelId },
    params: { prompt: "a lighthouse at dusk", steps: 2, seed: 7, guidance_scale: 0 }, // 0: guidance off
  });
  const png = reply.images[0].data;
  console.log(JSON.stringify({
    call: "Generate", executor_id: reply.executor_id, placement_reason: reply.placement_reason, tier: reply.tier,
    images: reply.images.length, seed: reply.images[0].seed, png: png.subarray(1, 4).toString() === "PNG",
    width: reply.images[0].width,
  }));

  // GenerateStream: load progress, one message per denoising step, then the result.
  const events = { load: 0, step: 0, result: 0 };
  let streamed = null;
  await new Promise((resolve, reject) => {
    const stream = router.GenerateStream({ model: { model_id: modelId }, params: { prompt: "a red boat", steps: 3 } });
    stream.on("data", (message) => {
      events[message.event] += 1; // oneofs: true names the field that is set
      if (message.event === "result") streamed = message.result;
    });
    stream.on("error", reject);
    stream.on("end", resolve);
  });
  console.log(JSON.stringify({
    call: "GenerateStream", events, images: streamed.images.length, seed: streamed.images[0].seed,
  }));

  // A bad request: INVALID_ARGUMENT, with ErrorInfo (the reason to branch on) and BadRequest (the fields).
  try {
    await call(router, "Generate", { model: { model_id: modelId }, params: { prompt: "x", steps: 100000 } });
    console.log(JSON.stringify({ call: "error", error: null }));
  } catch (error) {
    const details = errorDetails(error);
    console.log(JSON.stringify({
      call: "error", code: grpc.status[error.code], message: error.details, reason: details.ErrorInfo?.reason,
      domain: details.ErrorInfo?.domain, fields: details.BadRequest?.field_violations.map((v) => v.field),
    }));
  }
  // An unknown model: NOT_FOUND with reason MODEL_NOT_FOUND.
  try {
    await call(router, "Generate", { model: { model_id: "no-such-model" }, params: { prompt: "x" } });
  } catch (error) {
    console.log(JSON.stringify({ call: "error", code: grpc.status[error.code], reason: errorDetails(error).ErrorInfo?.reason }));
  }
  router.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
