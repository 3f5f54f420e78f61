// The DiffusionX session page: plain JavaScript, no build step, no external requests.
// A session lives here, in the page (as in the Python client): rounds of previews, then a finalize.
// Each request asks for server-sent events (Accept: text/event-stream) and reads them with fetch and a
// ReadableStream, so the progress bar follows the denoising steps; the last event is the JSON answer.
"use strict";

const $ = (id) => document.getElementById(id);
const session = { rounds: [], final: null };

function setBusy(busy) {
  $("preview-button").disabled = busy;
  $("finalize-button").disabled = busy || session.rounds.length === 0;
}

function showProgress(event) {
  $("progress").max = event.total_steps;
  $("progress").value = event.step;
  $("progress-text").textContent =
    `${event.tier}: step ${event.step}/${event.total_steps} (${Math.round(event.elapsed_ms)} ms)`;
}

// POST `body` to `path` as an event stream; calls onProgress per step and returns the final JSON.
// An error answer (4xx/503) is plain JSON: it is thrown with the server's message and status.
async function postWithProgress(path, body, onProgress) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify(body),
  });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      if (data.length === 0) continue;
      const payload = JSON.parse(data.join("\n"));
      if (name === "progress") onProgress(payload);
      else if (name === "result") return payload;
      else if (name === "error") {
        const error = new Error(payload.error);
        error.status = payload.status;
        throw error;
      }
    }
  }
  throw new Error(`the stream of ${path} ended without a result`);
}

// A request that names the previous round by id; if the server no longer knows the id (404), the
// image itself is sent instead.
async function withPreview(path, body, round) {
  try {
    return await postWithProgress(path, { ...body, preview_id: round.preview_id }, showProgress);
  } catch (error) {
    if (error.status !== 404) throw error;
    return await postWithProgress(path, { ...body, image: round.image }, showProgress);
  }
}

function addRound(round) {
  session.rounds.push(round);
  const item = document.createElement("li");
  item.className = "round";
  const image = document.createElement("img");
  image.src = `data:image/png;base64,${round.image}`;
  image.alt = round.prompt;
  const caption = document.createElement("span");
  let kind = "new";
  if (round.strength != null) {  // null or absent: a text-to-image round
    kind = `edit ${round.strength.toFixed(2)}` + (round.strength_predicted == null ? "" : ", predicted");
  }
  caption.textContent = `${session.rounds.length}. ${round.prompt} (${kind})`;
  item.append(image, caption);
  $("history").append(item);
  $("current-image").src = image.src;
  $("current-info").textContent =
    `round ${session.rounds.length}, ${round.num_inference_steps} steps, ` +
    `edge UNet calls ${round.unet_calls.edge}, ${Math.round(round.timings_ms.server_total)} ms`;
}

function showFinal(final) {
  session.final = final;
  $("final-image").src = `data:image/png;base64,${final.image}`;
  const rows = {
    route: final.route,
    "strength predicted": final.strength_predicted === null ? "(given)" : final.strength_predicted.toFixed(3),
    "strength used": final.strength_used.toFixed(3),
    steps: final.num_inference_steps,
    "UNet calls": `cloud ${final.unet_calls.cloud}, edge ${final.unet_calls.edge}, ` +
      `approximated ${final.unet_calls.approximated}`,
    reason: final.reason,
    time: `${Math.round(final.timings_ms.server_total)} ms`,
  };
  const list = $("final-info");
  list.replaceChildren();
  for (const [name, value] of Object.entries(rows)) {
    const term = document.createElement("dt");
    term.textContent = name;
    const detail = document.createElement("dd");
    detail.textContent = value;
    detail.dataset.field = name;
    list.append(term, detail);
  }
}

async function run(action) {
  $("error").textContent = "";
  setBusy(true);
  try {
    await action();
    $("progress-text").textContent = "done";
  } catch (error) {
    $("error").textContent = error.message;
    $("progress-text").textContent = "failed";
  } finally {
    setBusy(false);
  }
}

$("preview-button").addEventListener("click", () => run(async () => {
  const prompt = $("prompt").value.trim();
  if (!prompt) throw new Error("type a prompt first");
  const seed = Number($("seed").value);
  const previous = session.rounds[session.rounds.length - 1];
  const editing = previous !== undefined && $("edit").checked;
  // an empty strength field leaves the edit strength to the server's edit predictor
  const given = $("edit-strength").value.trim();
  const body = given === "" ? { prompt, seed } : { prompt, seed, strength: Number(given) };
  const result = editing
    ? await withPreview("v1/preview", body, previous)
    : await postWithProgress("v1/preview", { prompt, seed }, showProgress);
  addRound({ ...result, prompt });
}));

$("finalize-button").addEventListener("click", () => run(async () => {
  const last = session.rounds[session.rounds.length - 1];
  showFinal(await withPreview("v1/refine", { prompt: last.prompt, seed: last.seed }, last));
}));

$("reset-button").addEventListener("click", () => {
  session.rounds = [];
  session.final = null;
  $("history").replaceChildren();
  $("final-info").replaceChildren();
  for (const id of ["current-image", "final-image"]) $(id).removeAttribute("src");
  $("current-info").textContent = "";
  setBusy(false);
});

setBusy(false);
