// The ESM-2 playground (GET /api/v3/ui): one sequence's contact map, per-residue track and
// mutational-scan heatmap, drawn on canvas from the JSON API's own answers. No library: the page
// runs under a strict Content-Security-Policy (this origin only, no inline code) and offline.
//
// Each canvas carries its geometry in data attributes (data-left, data-top, data-cell-width,
// data-cell-height), and the heatmap its row order (data-rows) and colour-scale bound
// (data-scale-max), so a pixel can be traced back to its value (tests/test_playground.py does).

const API = "/api/v3";
// Heatmap rows, top to bottom; scan order within a position (and so the CSV's row order).
const AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY";
const MARGIN_LEFT = 40;
const FONT = "11px sans-serif";
const $ = (id) => document.getElementById(id);

let models = new Map();  // name -> the model's entry in GET /api/v3/models
let current = null;  // the run on screen: {sequence, name, model, encode, scores, blocks, ...}

class ApiError extends Error {
  constructor(status, code, detail, requestId) {
    super(detail);
    this.status = status;
    this.code = code;
    this.requestId = requestId;
  }
}

class InputError extends Error {}

// ---- the API --------------------------------------------------------------------------------
async function call(path, body, signal) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Token ${key}`;
  const response = await fetch(API + path, {
    method: body === undefined ? "GET" : "POST", headers, signal,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let parsed = null;
  try {
    parsed = JSON.parse(text);
  } catch {
    // an error body that is not JSON: shown as text below
  }
  const requestId = response.headers.get("x-request-id");
  if (!response.ok) {
    throw new ApiError(response.status, parsed?.code ?? "", parsed?.detail ?? (text.slice(0, 2048) || response.statusText),
                       parsed?.request_id ?? requestId);
  }
  return parsed;
}

// ---- input ----------------------------------------------------------------------------------
// A plain sequence (line breaks and spaces dropped) or one FASTA record. Letters are not checked
// here: the API's 400 names any bad one, and the page shows it.
function parseInput(text) {
  const lines = text.split(/\r?\n/);
  const headers = lines.filter((line) => line.startsWith(">"));
  if (headers.length > 1) throw new InputError(`paste one FASTA record; found ${headers.length}`);
  const name = headers.length ? headers[0].slice(1).trim().split(/\s+/)[0] : "";
  const sequence = lines.filter((line) => !line.startsWith(">")).join("").replace(/\s+/g, "");
  if (!sequence) throw new InputError("paste a protein sequence (or one FASTA record)");
  return {name, sequence};
}

// ---- colour scales ------------------------------------------------------------------------------
// Scan scores: linear from -scaleMax (blue 0,0,255) through 0 (white) to +scaleMax (red 255,0,0).
function scoreColour(value, scaleMax) {
  const t = scaleMax > 0 ? Math.max(-1, Math.min(1, value / scaleMax)) : 0;
  const fade = Math.round(255 * (1 - Math.abs(t)));
  return t < 0 ? [fade, fade, 255] : [255, fade, fade];
}
const WILD_TYPE = [0, 0, 0];
const NOT_SCORED = [221, 221, 221];
// Contacts: grey level 255 x (1 - p).
const contactGrey = (p) => Math.round(255 * (1 - Math.max(0, Math.min(1, p))));

const rgb = ([r, g, b]) => `rgb(${r},${g},${b})`;

function tickStep(pixelsPerPosition) {
  return [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000].find((step) => step * pixelsPerPosition >= 30) ?? 2000;
}

// Columns of the heatmap and the track line up: one column per residue.
function columnWidth(length) {
  return Math.max(2, Math.min(24, Math.floor(1200 / length)));
}

// A panel's canvas resized (which clears it), its geometry recorded, painted white: its 2-D context.
function freshCanvas(id, width, height, geometry) {
  const canvas = $(id);
  canvas.width = width;
  canvas.height = height;
  for (const [key, value] of Object.entries(geometry)) canvas.dataset[key] = String(value);
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  return ctx;
}

function positionTicks(ctx, length, left, cellWidth, y) {
  ctx.fillStyle = "#333";
  ctx.font = FONT;
  ctx.textAlign = "center";
  for (const position of tickPositions(length, cellWidth)) {
    ctx.fillText(String(position), left + (position - 0.5) * cellWidth, y);
  }
}

// 1, then the multiples of a step of at least 30 pixels that are not too close to 1.
function tickPositions(length, cellWidth) {
  const step = tickStep(cellWidth);
  const ticks = [1];
  for (let position = step; position <= length; position += step) {
    if ((position - 1) * cellWidth >= 30) ticks.push(position);
  }
  return ticks;
}

// ---- heatmap ----------------------------------------------------------------------------------
function drawHeatmap(run) {
  const length = run.sequence.length;
  const cellWidth = columnWidth(length), cellHeight = 12, top = 22;
  const letters = cellWidth >= 8;  // the wild type's letters under the columns, where they fit
  const legendTop = top + 20 * cellHeight + (letters ? 26 : 12);
  let scaleMax = 0;
  for (const value of run.scores) if (!Number.isNaN(value)) scaleMax = Math.max(scaleMax, Math.abs(value));
  const ctx = freshCanvas("heatmap", MARGIN_LEFT + length * cellWidth + 10, legendTop + 34,
                          {left: MARGIN_LEFT, top, cellWidth, cellHeight, rows: AMINO_ACIDS, scaleMax});
  positionTicks(ctx, length, MARGIN_LEFT, cellWidth, 14);
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let row = 0; row < 20; row++) ctx.fillText(AMINO_ACIDS[row], MARGIN_LEFT - 6, top + (row + 0.5) * cellHeight);
  ctx.textAlign = "center";
  for (let position = 0; letters && position < length; position++) {
    ctx.fillText(run.sequence[position], MARGIN_LEFT + (position + 0.5) * cellWidth, top + 20 * cellHeight + 8);
  }
  ctx.textBaseline = "alphabetic";
  for (let position = 0; position < length; position++) {
    for (let row = 0; row < 20; row++) {
      const value = run.scores[position * 20 + row];
      const colour = AMINO_ACIDS[row] === run.sequence[position] ? WILD_TYPE
        : Number.isNaN(value) ? NOT_SCORED : scoreColour(value, scaleMax);
      ctx.fillStyle = rgb(colour);
      ctx.fillRect(MARGIN_LEFT + position * cellWidth, top + row * cellHeight, cellWidth, cellHeight);
    }
  }
  // The legend: the colour scale from -m to +m.
  const legendWidth = 240;
  for (let x = 0; x < legendWidth; x++) {
    ctx.fillStyle = rgb(scoreColour((2 * x / (legendWidth - 1) - 1) * scaleMax, scaleMax));
    ctx.fillRect(MARGIN_LEFT + x, legendTop, 1, 10);
  }
  ctx.fillStyle = "#333";
  ctx.textAlign = "center";
  const bound = scaleMax ? scaleMax.toPrecision(3) : "0";
  ctx.fillText(`−${bound}`, MARGIN_LEFT, legendTop + 24);
  ctx.fillText("0", MARGIN_LEFT + legendWidth / 2, legendTop + 24);
  ctx.fillText(`+${bound}`, MARGIN_LEFT + legendWidth, legendTop + 24);
  ctx.textAlign = "left";
  ctx.fillText("masked-marginal score (nats)", MARGIN_LEFT + legendWidth + 30, legendTop + 10);
}

function heatmapAt(run, x, y) {
  const d = $("heatmap").dataset;
  const position = Math.floor((x - d.left) / d.cellWidth), row = Math.floor((y - d.top) / d.cellHeight);
  if (position < 0 || position >= run.sequence.length || row < 0 || row >= 20) return null;
  const wildType = run.sequence[position], substitute = AMINO_ACIDS[row];
  if (wildType === substitute) return `${wildType}${position + 1}: wild type`;
  const value = run.scores[position * 20 + row];
  const mutant = `${wildType}${position + 1}${substitute}`;
  return Number.isNaN(value) ? `${mutant}: not scored` : `${mutant}: masked_marginal ${value.toFixed(4)}`;
}

// ---- per-residue track ---------------------------------------------------------------------------
// Log-softmax over the 20 amino acids of each row of logits, in float64.
function perResidue(logits, vocabTokens, sequence) {
  return logits.map((row, position) => {
    const peak = Math.max(...row);
    const total = row.reduce((sum, value) => sum + Math.exp(value - peak), 0);
    const logProbs = row.map((value) => value - peak - Math.log(total));
    const entropy = -logProbs.reduce((sum, lp) => sum + Math.exp(lp) * lp, 0);
    const column = vocabTokens.indexOf(sequence[position]);
    return {logProb: column < 0 ? NaN : logProbs[column], entropy};
  });
}

function drawTrack(run) {
  const length = run.sequence.length;
  const cellWidth = columnWidth(length), stripHeight = 70, top = 22, gap = 18;
  const ctx = freshCanvas("track", MARGIN_LEFT + length * cellWidth + 10, top + 2 * stripHeight + gap + 8,
                          {left: MARGIN_LEFT, top, cellWidth, stripHeight, gap});
  positionTicks(ctx, length, MARGIN_LEFT, cellWidth, 14);
  const lowest = Math.min(-1, ...run.track.map((r) => r.logProb).filter((v) => !Number.isNaN(v)));
  const floor = Math.floor(lowest);
  const strips = [
    {key: "entropy", colour: "#e07b00", top, from: Math.log(20), to: 0, label: ["ln 20", "0"]},
    {key: "logProb", colour: "#1f5fbf", top: top + stripHeight + gap, from: 0, to: floor, label: ["0", String(floor)]},
  ];
  for (const strip of strips) {
    ctx.strokeStyle = "#ccc";
    ctx.strokeRect(MARGIN_LEFT + 0.5, strip.top + 0.5, length * cellWidth - 1, stripHeight - 1);
    ctx.fillStyle = "#333";
    ctx.textAlign = "right";
    ctx.fillText(strip.label[0], MARGIN_LEFT - 4, strip.top + 9);
    ctx.fillText(strip.label[1], MARGIN_LEFT - 4, strip.top + stripHeight);
    ctx.strokeStyle = strip.colour;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let drawing = false;
    run.track.forEach((residue, position) => {
      const value = residue[strip.key];
      if (Number.isNaN(value)) {
        drawing = false;
        return;
      }
      const x = MARGIN_LEFT + (position + 0.5) * cellWidth;
      const y = strip.top + (strip.from - value) / (strip.from - strip.to) * (stripHeight - 1);
      if (drawing) ctx.lineTo(x, y);
      else ctx.moveTo(x, y);
      drawing = true;
    });
    ctx.stroke();
  }
}

function trackAt(run, x) {
  const d = $("track").dataset;
  const position = Math.floor((x - d.left) / d.cellWidth);
  if (!run.track || position < 0 || position >= run.sequence.length) return null;
  const {logProb, entropy} = run.track[position];
  const letter = run.sequence[position];
  const logText = Number.isNaN(logProb) ? "not one of the 20" : logProb.toFixed(4);
  return `${letter}${position + 1}: log p(${letter}) ${logText}, entropy ${entropy.toFixed(4)}`;
}

// ---- contact map ----------------------------------------------------------------------------------
function drawContacts(run, contacts) {
  const length = contacts.length;
  const cell = Math.max(1, Math.min(12, Math.floor(640 / length))), top = 22, side = length * cell;
  const ctx = freshCanvas("contacts", MARGIN_LEFT + side + 10, top + side + 10,
                          {left: MARGIN_LEFT, top, cellWidth: cell, cellHeight: cell});
  positionTicks(ctx, length, MARGIN_LEFT, cell, 14);
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const position of tickPositions(length, cell)) {
    ctx.fillText(String(position), MARGIN_LEFT - 4, top + (position - 0.5) * cell);
  }
  ctx.textBaseline = "alphabetic";
  const image = ctx.createImageData(side, side);
  for (let i = 0; i < length; i++) {
    for (let j = 0; j < length; j++) {
      const grey = contactGrey(contacts[i][j]);
      for (let dy = 0; dy < cell; dy++) {
        for (let dx = 0; dx < cell; dx++) {
          const offset = 4 * ((i * cell + dy) * side + j * cell + dx);
          image.data[offset] = image.data[offset + 1] = image.data[offset + 2] = grey;
          image.data[offset + 3] = 255;
        }
      }
    }
  }
  ctx.putImageData(image, MARGIN_LEFT, top);
}

function contactsAt(run, x, y) {
  const d = $("contacts").dataset;
  const j = Math.floor((x - d.left) / d.cellWidth), i = Math.floor((y - d.top) / d.cellHeight);
  const contacts = run.encode?.response.results[0].contacts;
  if (!contacts || i < 0 || j < 0 || i >= contacts.length || j >= contacts.length) return null;
  return `${run.sequence[i]}${i + 1} – ${run.sequence[j]}${j + 1}: p ${contacts[i][j].toFixed(4)}`;
}

// ---- progress, errors ------------------------------------------------------------------------------
function progress(done, total, text) {
  $("progress").max = total;
  $("progress").value = done;
  $("progress-text").textContent = text;
}

function showError(error) {
  $("error").hidden = false;
  if (error instanceof ApiError) {
    $("error-status").textContent = `${error.status}${error.code ? " " + error.code : ""}:`;
    $("error-detail").textContent = error.message;
    $("error-request-id").textContent = error.requestId ?? "(none)";
    $("error-request-id").parentElement.hidden = false;
  } else {
    $("error-status").textContent = error instanceof InputError ? "Input:" : "Error:";
    $("error-detail").textContent = error.message;
    $("error-request-id").parentElement.hidden = true;
  }
}

// ---- a run ---------------------------------------------------------------------------------------
function scanBlockSize(model) {
  let size = Math.max(1, Number.parseInt($("block").value, 10) || 32);
  if (model?.max_score_passes > 0) size = Math.min(size, model.max_score_passes);
  if (model?.max_score_mutations > 0) size = Math.min(size, Math.max(1, Math.floor(model.max_score_mutations / 19)));
  return size;
}

function scanVariants(sequence, positions) {
  const variants = [];
  for (const position of positions) {
    for (const substitute of AMINO_ACIDS) {
      if (substitute !== sequence[position]) variants.push(`${sequence[position]}${position + 1}${substitute}`);
    }
  }
  return variants;
}

async function run(event) {
  event.preventDefault();
  $("error").hidden = true;
  let input;
  try {
    input = parseInput($("sequence").value);
  } catch (error) {
    showError(error);
    return;
  }
  const model = $("model").value;
  const controller = new AbortController();
  const length = input.sequence.length;
  const run = current = {
    ...input, model, controller, encode: null, blocks: [], track: null,
    scores: new Float64Array(length * 20).fill(NaN),
  };
  const scannable = [...Array(length).keys()].filter((p) => AMINO_ACIDS.includes(input.sequence[p]));
  const scanning = $("scan").checked;
  const total = 1 + (scanning ? scannable.length : 0);
  const started = performance.now();
  const seconds = () => `${((performance.now() - started) / 1000).toFixed(1)} s`;
  setBusy(true);
  for (const id of ["heatmap", "track", "contacts"]) $(id).width = $(id).height = 0;
  try {
    progress(0, total, `encode: contacts and logits of ${length} residues…`);
    const request = {params: {include: ["contacts", "logits"]}, items: [{sequence: input.sequence}]};
    const response = await call(`/${model}/encode/`, request, controller.signal);
    run.encode = {request, response};
    const result = response.results[0];
    drawContacts(run, result.contacts);
    run.track = perResidue(result.logits, result.vocab_tokens, input.sequence);
    drawTrack(run);
    if (scanning) drawHeatmap(run);
    refreshDownloads();
    const blockSize = scanBlockSize(models.get(model));
    let done = 0;
    for (let start = 0; scanning && start < scannable.length; start += blockSize) {
      const positions = scannable.slice(start, start + blockSize);
      progress(1 + done, total, `scan: positions ${positions[0] + 1}–${positions.at(-1) + 1} ` +
               `(${done} of ${scannable.length} scored, ${seconds()})…`);
      const variants = scanVariants(input.sequence, positions);
      const scoreRequest = {params: {method: "masked_marginal"}, items: [{sequence: input.sequence, variants}]};
      const scored = await call(`/${model}/score/`, scoreRequest, controller.signal);
      run.blocks.push({request: scoreRequest, response: scored});
      scored.results[0].scores.forEach((value, index) => {
        const variant = variants[index];
        const position = Number.parseInt(variant.slice(1, -1), 10) - 1;
        run.scores[position * 20 + AMINO_ACIDS.indexOf(variant.at(-1))] = value;
      });
      done += positions.length;
      drawHeatmap(run);
      refreshDownloads();
    }
    progress(total, total, `done: ${length} residues${scanning ? `, ${scannable.length} positions scanned` : ""} ` +
             `in ${seconds()}`);
  } catch (error) {
    if (error.name === "AbortError") {
      const scored = run.blocks.reduce((n, block) => n + block.request.items[0].variants.length / 19, 0);
      progress($("progress").value, total, `cancelled after ${seconds()}: ${scored} of ${scannable.length} positions scanned`);
    } else {
      showError(error);
      progress($("progress").value, total, "stopped by an error");
    }
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  $("run").disabled = busy;
  $("cancel").disabled = !busy;
}

// ---- downloads -----------------------------------------------------------------------------------
function fileStem(run) {
  return `${(run.name || "sequence").replace(/[^A-Za-z0-9._-]+/g, "_").slice(0, 60)}-${run.model}`;
}

function save(blob, filename) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = filename;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

// The columns, order and number format of `esm2 score --scan` (esm2_client/cli.py): position by
// position, substitutions in alphabetical order; only what has been scored (a cancelled scan's part).
function scanCsv(run) {
  const lines = ["position,wild_type,mutant,variant,method,score"];
  for (let position = 0; position < run.sequence.length; position++) {
    for (let row = 0; row < 20; row++) {
      const value = run.scores[position * 20 + row];
      if (Number.isNaN(value)) continue;
      const wildType = run.sequence[position], substitute = AMINO_ACIDS[row];
      lines.push([position + 1, wildType, substitute, `${wildType}${position + 1}${substitute}`, "masked_marginal",
                  value.toFixed(6)].join(","));
    }
  }
  return lines.join("\r\n") + "\r\n";
}

function refreshDownloads() {
  $("download-csv").disabled = !current?.blocks.length;
  $("download-json").disabled = !current?.encode;
  for (const button of document.querySelectorAll("button.png")) button.disabled = !$(button.dataset.canvas).width;
}

function downloadCsv() {
  save(new Blob([scanCsv(current)], {type: "text/csv"}), `${fileStem(current)}-scan.csv`);
}

function downloadJson() {
  const {name, sequence, model, encode, blocks} = current;
  const body = JSON.stringify({name, sequence, model, encode, score: blocks});
  save(new Blob([body], {type: "application/json"}), `${fileStem(current)}.json`);
}

function downloadPng(event) {
  const id = event.target.dataset.canvas;
  $(id).toBlob((blob) => save(blob, `${fileStem(current)}-${id}.png`), "image/png");
}

// ---- hover ---------------------------------------------------------------------------------------
function hover(canvasId, describe) {
  const canvas = $(canvasId), readout = $(`${canvasId}-readout`), tooltip = $("tooltip");
  canvas.addEventListener("mousemove", (event) => {
    const box = canvas.getBoundingClientRect();
    const text = current && describe(current, event.clientX - box.left, event.clientY - box.top);
    readout.textContent = text ?? "";
    tooltip.hidden = !text;
    if (text) {
      tooltip.textContent = text;
      tooltip.style.left = `${event.pageX + 12}px`;
      tooltip.style.top = `${event.pageY + 12}px`;
    }
  });
  canvas.addEventListener("mouseleave", () => {
    tooltip.hidden = true;
  });
}

// ---- start ---------------------------------------------------------------------------------------
function describeModel() {
  const model = models.get($("model").value);
  $("model-note").textContent = !model ? "" : [
    `${model.name}: ${model.num_layers} layers, ${model.parameters.toLocaleString("en")} parameters, on ${model.device}`,
    `up to ${model.max_sequence_length} residues`,
    model.random_weights ? "RANDOM WEIGHTS: a test checkpoint, its outputs are meaningless" : "",
    model.ready ? "" : "not ready yet",
  ].filter(Boolean).join("; ");
}

async function start() {
  $("api-key-field").hidden = document.body.dataset.apiKeys !== "on";
  $("query").addEventListener("submit", run);
  $("cancel").addEventListener("click", () => current?.controller.abort());
  $("model").addEventListener("change", describeModel);
  $("download-csv").addEventListener("click", downloadCsv);
  $("download-json").addEventListener("click", downloadJson);
  for (const button of document.querySelectorAll("button.png")) button.addEventListener("click", downloadPng);
  hover("heatmap", heatmapAt);
  hover("track", trackAt);
  hover("contacts", contactsAt);
  try {
    const listed = await call("/models");
    models = new Map(listed.models.map((model) => [model.name, model]));
    for (const name of models.keys()) $("model").add(new Option(name, name));
    describeModel();
    document.body.dataset.ready = "true";
  } catch (error) {
    showError(error);
  }
}

start();
