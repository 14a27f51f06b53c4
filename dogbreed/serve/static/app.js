"use strict";
// The dogbreed page: POST a photo to /invocations?explain=true, show the top 5 and the Grad-CAM heat map.
// Images are decoded with createImageBitmap and drawn on a canvas, so the page needs no data: or blob: URLs
// and its Content-Security-Policy can stay at 'self'.

const $ = (id) => document.getElementById(id);
const fileInput = $("file");
const drop = $("drop");
const statusLine = $("status");
const result = $("result");
const top5 = $("top5");
const figure = $("explanation");
const canvas = $("heatmap");
const caption = $("caption");
const opacity = $("opacity");

let shown = null; // {photo: ImageBitmap, heat: ImageData} of the last answer
let asked = 0; // answers to an earlier photo than the last one are dropped

const pretty = (label) => label.replaceAll("_", " ");
const clamp = (x) => Math.min(1, Math.max(0, x));

// the "jet" ramp: blue (little evidence) through green and yellow to red (most)
function jet(v) {
  return [clamp(1.5 - Math.abs(4 * v - 3)), clamp(1.5 - Math.abs(4 * v - 2)), clamp(1.5 - Math.abs(4 * v - 1))];
}

function post(file, explain) {
  return fetch(`invocations?explain=${explain}`, {
    method: "POST",
    headers: { "Content-Type": file.type || "application/octet-stream", Accept: "application/json" },
    body: file,
  });
}

async function ask(file) {
  const ticket = ++asked;
  result.hidden = true; // never show the answer about the previous photo next to this one
  statusLine.className = "";
  statusLine.textContent = `Looking at ${file.name}…`;
  try {
    let response = await post(file, true);
    let answer = await response.json();
    let note = "";
    if (response.status === 400 && answer.error === "explain_needs_eager") {
      note = answer.message; // TorchScript and ONNX models answer without a heat map
      response = await post(file, false);
      answer = await response.json();
    }
    if (ticket !== asked) return;
    // the server's messages end with what it accepts, after "; ": for a person the reason is enough
    if (!response.ok) throw new Error(answer.message?.split("; ")[0] || `${response.status} ${response.statusText}`);
    showTop5(answer.predictions);
    await showExplanation(answer.explanation);
    statusLine.textContent = note ? `${file.name}: no heat map (${note})` : file.name;
    result.hidden = false;
  } catch (err) {
    if (ticket !== asked) return;
    statusLine.className = "error";
    statusLine.textContent = `No answer for ${file.name}: ${err.message}`;
  }
}

function showTop5(predictions) {
  top5.replaceChildren(
    ...predictions.slice(0, 5).map((p) => {
      const item = document.createElement("li");
      item.dataset.label = p.label;
      item.dataset.probability = p.probability;
      const row = document.createElement("span");
      row.className = "row";
      const name = document.createElement("span");
      name.className = "label";
      name.textContent = pretty(p.label);
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = `${(100 * p.probability).toFixed(1)}%`;
      bar.append(fill);
      const percent = document.createElement("span");
      percent.className = "probability";
      percent.textContent = p.probability < 0.001 ? "< 0.1 %" : `${(100 * p.probability).toFixed(1)} %`;
      row.append(name, percent);
      item.append(row, bar);
      return item;
    }),
  );
}

async function bitmap(base64, type) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return createImageBitmap(new Blob([bytes], { type }));
}

async function showExplanation(explanation) {
  figure.hidden = !explanation;
  shown = null;
  if (!explanation) return;
  const [photo, heat] = await Promise.all([
    bitmap(explanation.input_jpeg, "image/jpeg"),
    bitmap(explanation.heatmap_png, "image/png"),
  ]);
  const scratch = document.createElement("canvas");
  scratch.width = heat.width;
  scratch.height = heat.height;
  const context = scratch.getContext("2d", { willReadFrequently: true });
  context.drawImage(heat, 0, 0);
  shown = { photo, heat: context.getImageData(0, 0, heat.width, heat.height) };
  caption.textContent = `Where the model looked for “${pretty(explanation.label)}” (Grad-CAM on ${explanation.layer})`;
  draw();
}

// The crop the model saw, with the heat map in colour on top: stronger evidence, more opaque.
function draw() {
  const { photo, heat } = shown;
  const strength = opacity.value / 100;
  const layer = new ImageData(heat.width, heat.height);
  for (let i = 0; i < heat.data.length; i += 4) {
    const v = heat.data[i] / 255;
    const [r, g, b] = jet(v);
    layer.data.set([255 * r, 255 * g, 255 * b, 255 * strength * (0.25 + 0.75 * v)], i);
  }
  const scratch = document.createElement("canvas");
  scratch.width = heat.width;
  scratch.height = heat.height;
  scratch.getContext("2d").putImageData(layer, 0, 0);
  const context = canvas.getContext("2d");
  context.imageSmoothingQuality = "high";
  context.clearRect(0, 0, canvas.width, canvas.height);
  context.drawImage(photo, 0, 0, canvas.width, canvas.height);
  context.drawImage(scratch, 0, 0, canvas.width, canvas.height);
}

fileInput.addEventListener("change", () => fileInput.files[0] && ask(fileInput.files[0]));
opacity.addEventListener("input", () => shown && draw());
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  const file = event.dataTransfer.files[0];
  if (file) ask(file);
});
// a photo dropped next to the zone must not make the browser leave the page to open it
for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());

// Say what this server serves, so that nobody takes a Fashion-MNIST demo model for a dog-breed one
async function describeModel() {
  try {
    const response = await fetch("model", { headers: { Accept: "application/json" } });
    if (!response.ok) return;
    const about = await response.json();
    const names = about.classes.map(pretty);
    const listed = names.length > 6 ? `${names.slice(0, 5).join(", ")}, … ${names[names.length - 1]}` : names.join(", ");
    const run = about.source ? about.source.split("/").filter(Boolean).pop() : "an unnamed run";
    $("title").textContent = `Which of its ${names.length} classes is it?`;
    $("about").textContent =
      `A ${about.backbone} that knows ${names.length} classes (${listed}), trained in run ${run}, served with the ` +
      `${about.runtime} runtime. Pick or drop a photo: it answers with its five likeliest classes and shows where ` +
      "it looked.";
    $("about").title = about.source || "";
  } catch (err) {
    // the page still works without the description: keep the generic text
  }
}
describeModel();
