// The mukv page: start a stream (a file under the server's allowed directories, a live URL, or
// this browser's webcam), watch its timeline, ask questions and see the spans each answer was
// drawn from. Plain JavaScript against the server's own API; every string from the server or the
// user is rendered with textContent, never parsed as HTML.
"use strict";

(() => {
  const POLL_MS = 1000; // how often a file or live stream's info is read while it is shown
  const MAX_ERRORS = 5; // error notices kept on screen
  const MAX_TICKS = 2000; // frame ticks kept on the timeline (the newest)
  const MAX_CAPTURE_WIDTH = 640; // webcam frames are scaled down to this width before sending
  const MAX_BUFFERED_BYTES = 4 * 1024 * 1024; // frames waiting in the socket beyond this are skipped
  const JPEG_QUALITY = 0.85;
  const READY_RETRY_MS = 3000; // while the server loads its model, ask again this often…
  const READY_ATTEMPTS = 100; // …this many times at most
  // Colours of the granularities the server's methods use; others get one of the spare colours.
  const GRANULARITY_COLOURS = { frame: "#e07a1f", patch: "#1f9e89", segment: "#7b4fc9" };
  const SPARE_COLOURS = ["#c2417a", "#5a8f29", "#3b6fb6", "#a67c00"];

  const $ = (id) => document.getElementById(id);

  /** An API error as the server describes it: {"error": {"code", "message", "field"?}}. */
  class ApiError extends Error {
    constructor(code, message, field = null, status = null) {
      super(message);
      this.code = code;
      this.field = field;
      this.status = status;
    }
  }

  // -- state ------------------------------------------------------------------------------------
  const state = {
    stream: null, // the shown stream's info, as GET /v1/streams/{id} returns it
    streamId: null,
    pollTimer: null,
    polling: false, // a poll request is in flight
    socket: null, // the shown stream's WebSocket (webcam streams)
    socketReady: false, // the socket's "ready" message arrived
    media: null, // the webcam's MediaStream
    captureTimer: null,
    captureFps: 1,
    capturing: false, // a frame is being encoded
    frameTimes: [], // timestamps of frames the server accepted (known for webcam streams)
    answers: [], // {id, question, text, element, result, controller}
    selected: null, // the answer whose spans the timeline shows
    questionCount: 0,
    granularities: new Map(), // granularity -> colour, in order of appearance
  };

  // -- talking to the server --------------------------------------------------------------------
  function authHeaders() {
    const token = $("token").value.trim();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  /** The error of a failed response: the server's JSON error where it sent one. */
  async function errorOf(response) {
    try {
      const body = await response.json();
      if (body && body.error && typeof body.error.code === "string") {
        return new ApiError(body.error.code, String(body.error.message ?? ""), body.error.field ?? null, response.status);
      }
    } catch (_) {
      // not JSON: fall back to the status line
    }
    return new ApiError(`http_${response.status}`, response.statusText || `HTTP ${response.status}`, null, response.status);
  }

  async function request(method, path, body, signal) {
    const headers = authHeaders();
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError("network_error", `cannot reach the server: ${error.message}`);
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async function api(method, path, body) {
    return (await request(method, path, body)).json();
  }

  // -- errors -----------------------------------------------------------------------------------
  /** Show an error to the user: "<what>: <code>: <message> (field)". */
  function showError(what, error) {
    const box = $("errors");
    const item = document.createElement("div");
    item.className = "error";
    item.dataset.code = error.code || "error";
    const code = document.createElement("span");
    code.className = "code";
    code.textContent = error.code || "error";
    const message = document.createElement("span");
    message.className = "message";
    let text = `${what}: ${error.message}`;
    if (error.field) text += ` (field: ${error.field})`;
    message.textContent = text;
    const close = document.createElement("button");
    close.type = "button";
    close.textContent = "Dismiss";
    close.addEventListener("click", () => item.remove());
    item.append(code, message, close);
    box.prepend(item);
    while (box.children.length > MAX_ERRORS) box.lastElementChild.remove();
  }

  /** Run an async action for a button, showing its error; the button is disabled meanwhile.
   * Returns whether the action succeeded. */
  async function guarded(what, button, action) {
    if (button) button.disabled = true;
    try {
      await action();
      return true;
    } catch (error) {
      showError(what, error instanceof ApiError ? error : new ApiError(error.name || "error", error.message));
      return false;
    } finally {
      if (button) button.disabled = false;
    }
  }

  // -- formatting ---------------------------------------------------------------------------------
  const seconds = (value) => (value === null || value === undefined ? "–" : `${Number(value).toFixed(1)} s`);

  function bytes(value) {
    if (!Number.isFinite(value)) return "–";
    const units = ["B", "KiB", "MiB", "GiB"];
    let index = 0;
    while (value >= 1024 && index < units.length - 1) {
      value /= 1024;
      index += 1;
    }
    return `${value.toFixed(index ? 1 : 0)} ${units[index]}`;
  }

  function colourOf(granularity) {
    if (!state.granularities.has(granularity)) {
      const known = GRANULARITY_COLOURS[granularity];
      const spare = SPARE_COLOURS[state.granularities.size % SPARE_COLOURS.length];
      state.granularities.set(granularity, known || spare);
      renderLegend();
    }
    return state.granularities.get(granularity);
  }

  function renderLegend() {
    const legend = $("legend");
    legend.replaceChildren();
    for (const [granularity, colour] of state.granularities) {
      const item = document.createElement("li");
      item.dataset.granularity = granularity;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colour;
      const name = document.createElement("span");
      name.textContent = granularity;
      item.append(swatch, name);
      legend.append(item);
    }
  }

  // -- file sources -----------------------------------------------------------------------------
  async function loadSources() {
    const select = $("file-select");
    const listing = await api("GET", "/v1/sources");
    const previous = select.value;
    select.replaceChildren();
    for (const file of listing.data) {
      const option = document.createElement("option");
      option.value = file.name;
      option.textContent = `${file.name} (${bytes(file.size)})`;
      select.append(option);
    }
    if (listing.data.some((file) => file.name === previous)) select.value = previous;
    let note = listing.data.length ? "" : "No video files under the server's allowed directories.";
    if (listing.truncated) note = "Showing the first files only.";
    $("file-note").textContent = note;
  }

  // -- streams ----------------------------------------------------------------------------------
  function method() {
    const value = $("method").value.trim();
    return value ? { method: value } : {};
  }

  function number(id) {
    const value = $(id).value.trim();
    return value === "" ? undefined : Number(value);
  }

  async function createStream(body) {
    const info = await api("POST", "/v1/streams", { ...method(), ...body });
    await refreshStreamList();
    return info;
  }

  async function refreshStreamList() {
    const listing = await api("GET", "/v1/streams");
    const list = $("stream-list");
    list.replaceChildren();
    for (const info of listing.data) {
      const item = document.createElement("li");
      item.dataset.stream = info.id;
      if (info.id === state.streamId) item.classList.add("selected");
      const open = document.createElement("button");
      open.type = "button";
      open.className = "mono";
      open.textContent = info.id;
      open.title = "Show this stream";
      open.addEventListener("click", () => guarded("showing the stream", open, () => showStream(info)));
      const kind = document.createElement("span");
      kind.textContent = info.source.kind;
      const stateLabel = document.createElement("span");
      stateLabel.className = "state";
      stateLabel.textContent = info.state;
      item.append(open, kind, stateLabel);
      list.append(item);
    }
  }

  /** Leave the shown stream: stop polling, close its socket and camera, forget its answers. */
  function leaveStream() {
    clearInterval(state.pollTimer);
    state.pollTimer = null;
    stopCapture();
    if (state.socket) {
      state.socket.onclose = null;
      state.socket.close(1000, "the page shows another stream");
      state.socket = null;
    }
    state.socketReady = false;
    for (const answer of state.answers) {
      if (answer.controller) answer.controller.abort();
    }
    state.stream = null;
    state.streamId = null;
    state.frameTimes = [];
    state.answers = [];
    state.selected = null;
    $("answers").replaceChildren();
    $("stream-id").textContent = "none";
    $("stream-stop").disabled = true;
    $("ask").disabled = true;
    render();
  }

  /** Show a stream: its info is polled (file and live streams) or comes over its WebSocket. */
  async function showStream(info, { socket = false } = {}) {
    leaveStream();
    state.streamId = info.id;
    state.stream = info;
    $("stream-id").textContent = info.id;
    $("stream-stop").disabled = false;
    $("ask").disabled = false;
    for (const item of $("stream-list").children) {
      item.classList.toggle("selected", item.dataset.stream === info.id);
    }
    if (socket) {
      await openSocket(info.id);
    } else {
      state.pollTimer = setInterval(poll, POLL_MS);
      poll();
    }
    render();
  }

  async function poll() {
    if (state.polling || !state.streamId) return;
    const id = state.streamId;
    state.polling = true;
    try {
      const info = await api("GET", `/v1/streams/${encodeURIComponent(id)}`);
      if (id !== state.streamId) return;
      state.stream = info;
      render();
      // A source that ended, with nothing left to encode, changes no more: stop asking.
      const frames = info.frames;
      if (["ended", "stopped", "failed"].includes(info.state) && frames.queued === 0 && frames.encoding === 0) {
        clearInterval(state.pollTimer);
        state.pollTimer = null;
        if (info.state === "failed" && info.error) {
          showError(`stream ${id}`, new ApiError(info.error.code, info.error.message, info.error.field));
        }
        refreshStreamList().catch(() => {});
      }
    } catch (error) {
      if (id !== state.streamId) return; // the page moved on to another stream meanwhile
      clearInterval(state.pollTimer);
      state.pollTimer = null;
      showError(`reading stream ${id}`, error);
    } finally {
      state.polling = false;
    }
  }

  async function stopStream() {
    const id = state.streamId;
    if (!id) return;
    leaveStream();
    await api("DELETE", `/v1/streams/${encodeURIComponent(id)}`);
    await refreshStreamList();
  }

  // -- the webcam -------------------------------------------------------------------------------
  async function startWebcam() {
    const fps = number("webcam-fps") ?? 1;
    if (!(fps > 0 && fps <= 30)) throw new ApiError("invalid_fps", "webcam fps: between 0 and 30");
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new ApiError("camera_unavailable", "the browser offers no camera here: open the page on localhost or HTTPS");
    }
    // The camera first, so that a refused permission leaves no stream behind.
    const media = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 } },
      audio: false,
    });
    let info;
    try {
      info = await createStream({ source: "push" });
    } catch (error) {
      media.getTracks().forEach((track) => track.stop());
      throw error;
    }
    await showStream(info, { socket: true });
    state.media = media;
    const preview = $("preview");
    preview.srcObject = media;
    preview.hidden = false;
    state.captureFps = fps;
    await preview.play().catch(() => {}); // muted autoplay is allowed; a refusal only hides the preview
    startCapture();
  }

  /** Send frames once both the camera and the socket are ready (in whichever order they are). */
  function startCapture() {
    if (!state.media || !state.socketReady || state.captureTimer) return;
    state.captureTimer = setInterval(captureFrame, 1000 / state.captureFps);
  }

  function stopCapture() {
    clearInterval(state.captureTimer);
    state.captureTimer = null;
    if (state.media) {
      state.media.getTracks().forEach((track) => track.stop());
      state.media = null;
    }
    const preview = $("preview");
    preview.srcObject = null;
    preview.hidden = true;
  }

  /** Send the camera's current picture as one JPEG over the socket (stamped by the server). */
  function captureFrame() {
    const preview = $("preview");
    const socket = state.socket;
    if (!socket || socket.readyState !== WebSocket.OPEN || preview.readyState < 2 || state.capturing) return;
    // A slow link: skip this frame rather than queue without bound in the browser.
    if (socket.bufferedAmount > MAX_BUFFERED_BYTES) return;
    const scale = Math.min(1, MAX_CAPTURE_WIDTH / preview.videoWidth);
    const canvas = $("capture");
    canvas.width = Math.max(1, Math.round(preview.videoWidth * scale));
    canvas.height = Math.max(1, Math.round(preview.videoHeight * scale));
    canvas.getContext("2d").drawImage(preview, 0, 0, canvas.width, canvas.height);
    state.capturing = true;
    canvas.toBlob(
      (blob) => {
        state.capturing = false;
        if (blob && socket.readyState === WebSocket.OPEN) socket.send(blob);
      },
      "image/jpeg",
      JPEG_QUALITY,
    );
  }

  // -- the WebSocket ----------------------------------------------------------------------------
  /** Open the stream's socket; the token travels as a subprotocol (browsers cannot set headers). */
  function openSocket(id) {
    const token = $("token").value.trim();
    const protocols = token ? ["mukv.v1", `bearer.${token}`] : ["mukv.v1"];
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/v1/streams/${encodeURIComponent(id)}/ws`;
    let socket;
    try {
      socket = new WebSocket(url, protocols);
    } catch (error) {
      // A token with characters a subprotocol cannot hold (the constructor refuses it).
      throw new ApiError("invalid_token", `cannot open the stream's WebSocket: ${error.message}`);
    }
    state.socket = socket;
    let opened = false;
    return new Promise((resolve) => {
      socket.onopen = () => {
        opened = true;
        resolve();
      };
      socket.onmessage = (event) => onSocketMessage(socket, event);
      socket.onclose = (event) => {
        resolve();
        if (state.socket !== socket) return;
        state.socket = null;
        state.socketReady = false;
        stopCapture();
        for (const answer of state.answers) {
          if (!answer.result && !answer.failed) failAnswer(answer, new ApiError("socket_closed", "the WebSocket closed"));
        }
        // A refused handshake reaches a page as code 1006 with no reason: say what refuses one.
        const reason = event.reason
          ? `: ${event.reason}`
          : opened
            ? ""
            : ": the server refused it (a wrong or missing token, or the model is still loading)";
        showError("the stream's WebSocket", new ApiError("socket_closed", `closed (code ${event.code})${reason}`));
      };
    });
  }

  function onSocketMessage(socket, event) {
    if (state.socket !== socket || typeof event.data !== "string") return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    switch (message.type) {
      case "ready":
        state.stream = message.stream;
        state.socketReady = true;
        startCapture();
        break;
      case "stream":
        state.stream = message.stream;
        break;
      case "frames":
        for (const t of message.timestamps || []) state.frameTimes.push(t);
        if (state.frameTimes.length > MAX_TICKS) state.frameTimes.splice(0, state.frameTimes.length - MAX_TICKS);
        if (state.stream) state.stream.time = Math.max(state.stream.time ?? 0, ...(message.timestamps || [0]));
        break;
      case "token": {
        const answer = findAnswer(message.id);
        if (answer) addToken(answer, message.text);
        return;
      }
      case "done": {
        const answer = findAnswer(message.id);
        if (answer) finishAnswer(answer, message);
        break;
      }
      case "error": {
        const error = new ApiError(message.error?.code ?? "error", message.error?.message ?? "", message.error?.field);
        // Only an error under a question's own id ends it; one naming it as "ref" (a refused message
        // about it) leaves it running.
        const answer = message.id ? findAnswer(message.id) : null;
        if (answer) failAnswer(answer, error);
        else showError("the stream's WebSocket", error);
        break;
      }
      default:
        return;
    }
    render();
  }

  // -- questions --------------------------------------------------------------------------------
  const findAnswer = (id) => state.answers.find((answer) => answer.id === id);

  function newAnswer(question) {
    state.questionCount += 1;
    const answer = { id: `q${state.questionCount}`, question, text: "", result: null, failed: false };
    const item = document.createElement("li");
    item.className = "answer";
    item.dataset.answer = answer.id;
    const title = document.createElement("div");
    title.className = "question";
    title.textContent = question;
    const text = document.createElement("div");
    text.className = "text";
    const status = document.createElement("div");
    status.className = "status";
    status.textContent = "waiting for the first token…";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.textContent = "Cancel";
    cancel.addEventListener("click", (event) => {
      event.stopPropagation();
      cancelAnswer(answer);
    });
    item.append(title, text, status, cancel);
    item.addEventListener("click", () => selectAnswer(answer));
    answer.element = item;
    $("answers").prepend(item);
    state.answers.push(answer);
    return answer;
  }

  function addToken(answer, text) {
    if (answer.failed) return; // cancelled: what was already on its way is dropped
    answer.text += text;
    answer.element.querySelector(".text").textContent = answer.text;
    answer.element.querySelector(".status").textContent = "answering…";
  }

  function finishAnswer(answer, result) {
    if (answer.failed) return;
    answer.result = result;
    answer.element.querySelector("button")?.remove();
    // The done event carries the whole answer: it is the text to keep (tokens may split characters).
    answer.text = result.answer;
    answer.element.querySelector(".text").textContent = result.answer;
    answer.element.classList.add("done");
    const first = result.server?.first_token;
    answer.element.querySelector(".status").textContent =
      `at ${seconds(result.time)} · ${result.frames_seen} frames seen · ${result.generated_tokens} tokens` +
      (Number.isFinite(first) ? ` · first token ${first.toFixed(2)} s` : "") +
      ` · ${result.retrieved.length} spans retrieved`;
    const spans = document.createElement("div");
    spans.className = "spans";
    spans.append(spanTable(result.retrieved));
    answer.element.append(spans);
    selectAnswer(answer);
  }

  function failAnswer(answer, error) {
    answer.failed = true;
    answer.element.querySelector("button")?.remove();
    answer.element.classList.add("failed");
    let text = `${error.code}: ${error.message}`;
    if (error.field) text += ` (field: ${error.field})`;
    answer.element.querySelector(".status").textContent = text;
  }

  function cancelAnswer(answer) {
    if (answer.controller) answer.controller.abort();
    else if (state.socket) state.socket.send(JSON.stringify({ type: "cancel", id: answer.id }));
    failAnswer(answer, new ApiError("cancelled", "cancelled by the user"));
  }

  function spanTable(spans) {
    const table = document.createElement("table");
    table.className = "retrieved";
    const head = table.createTHead().insertRow();
    for (const label of ["granularity", "frames", "time", "score"]) {
      const cell = document.createElement("th");
      cell.textContent = label;
      head.append(cell);
    }
    const body = table.createTBody();
    for (const span of spans) {
      const row = body.insertRow();
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colourOf(span.granularity);
      const name = row.insertCell();
      name.append(swatch, ` ${span.granularity}`);
      row.insertCell().textContent = `${span.first_frame}–${span.last_frame}`;
      row.insertCell().textContent = `${seconds(span.start_time)}–${seconds(span.end_time)}`;
      row.insertCell().textContent = Number.isFinite(span.score) ? span.score.toFixed(3) : "–";
    }
    return table;
  }

  function selectAnswer(answer) {
    state.selected = answer;
    for (const other of state.answers) other.element.classList.toggle("selected", other === answer);
    render();
  }

  async function ask() {
    const question = $("question").value.trim();
    if (!question) throw new ApiError("invalid_request", "question: type a question first", "question");
    if (!state.streamId) throw new ApiError("no_stream", "start or choose a stream first");
    const body = { question };
    const maxTokens = number("max-tokens");
    if (maxTokens !== undefined) body.max_new_tokens = maxTokens;
    const answer = newAnswer(question);
    if (state.socket && state.socket.readyState === WebSocket.OPEN) {
      state.socket.send(JSON.stringify({ type: "question", id: answer.id, ...body }));
      return;
    }
    await askOverHttp(answer, body);
  }

  /** POST the question and read its Server-Sent Events as they arrive (EventSource cannot POST). */
  async function askOverHttp(answer, body) {
    const controller = new AbortController();
    answer.controller = controller;
    const id = state.streamId;
    try {
      const response = await request("POST", `/v1/streams/${encodeURIComponent(id)}/questions`, body, controller.signal);
      for await (const event of serverSentEvents(response.body)) {
        const data = JSON.parse(event.data);
        if (event.name === "token") addToken(answer, data.text);
        else if (event.name === "done") finishAnswer(answer, data);
        else if (event.name === "error") failAnswer(answer, new ApiError(data.error.code, data.error.message, data.error.field));
      }
      if (!answer.result && !answer.failed) failAnswer(answer, new ApiError("incomplete", "the answer ended early"));
    } catch (error) {
      if (error.name === "AbortError") return;
      failAnswer(answer, error instanceof ApiError ? error : new ApiError("error", error.message));
      showError("asking", error instanceof ApiError ? error : new ApiError("error", error.message));
    } finally {
      answer.controller = null;
    }
    if (id === state.streamId && !state.pollTimer && !state.socket) poll(); // the answer counters changed
  }

  /** Events {name, data} of an SSE body: blank-line separated blocks of "event:" and "data:"
   * lines; comment lines (":" keep-alive pings) are skipped. */
  async function* serverSentEvents(stream) {
    const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      while (true) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let name = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let value = colon < 0 ? "" : line.slice(colon + 1);
            if (value.startsWith(" ")) value = value.slice(1);
            if (field === "event") name = value;
            else if (field === "data") data.push(value);
          }
          if (data.length) yield { name, data: data.join("\n") };
        }
      }
    } finally {
      reader.releaseLock();
    }
  }

  // -- rendering --------------------------------------------------------------------------------
  function render() {
    renderInfo();
    renderTimeline();
  }

  function renderInfo() {
    const list = $("stream-info");
    list.replaceChildren();
    const info = state.stream;
    if (!info) return;
    const frames = info.frames || {};
    const rows = [
      ["state", info.state],
      ["source", info.source.url || info.source.path || info.source.kind],
      ["method", info.preset ? `${info.method} (${info.preset})` : info.method],
      [
        "frames",
        `${frames.received ?? 0} received · ${frames.encoded ?? 0} encoded · ${frames.queued ?? 0} queued · ` +
          `${frames.dropped ?? 0} dropped`,
      ],
      ["stream time", seconds(info.time)],
      ["in memory up to", seconds(info.encoded_time)],
      ["memory", bytes(info.memory?.total_bytes)],
    ];
    if (info.lag_seconds !== null && info.lag_seconds !== undefined) rows.push(["behind", seconds(info.lag_seconds)]);
    for (const [label, value] of rows) {
      const term = document.createElement("dt");
      term.textContent = label;
      const detail = document.createElement("dd");
      detail.textContent = value;
      detail.dataset.field = label;
      list.append(term, detail);
    }
  }

  /** The timeline spans [0, extent]: the stream time, a source's playing position, or the end of
   * a retrieved span, whichever is latest. */
  function renderTimeline() {
    const info = state.stream;
    const spans = state.selected?.result?.retrieved || [];
    const times = [1, info?.time, info?.position, info?.encoded_time, ...spans.map((span) => span.end_time)];
    const extent = Math.max(...times.filter(Number.isFinite));
    const percent = (t) => `${Math.min(100, Math.max(0, (100 * t) / extent))}%`;
    const timeline = $("timeline");
    timeline.querySelector(".received").style.width = percent(info?.time ?? 0);
    timeline.querySelector(".encoded").style.width = percent(info?.encoded_time ?? 0);
    const ticks = timeline.querySelector(".ticks");
    ticks.replaceChildren(
      ...state.frameTimes.map((t) => {
        const tick = document.createElement("div");
        tick.className = "tick";
        tick.style.left = percent(t);
        return tick;
      }),
    );
    $("timeline-end").textContent = seconds(extent);
    const frames = info?.frames?.received ?? 0;
    $("timeline-label").textContent = info
      ? `${frames} frames · stream time ${seconds(info.time)} · in memory up to ${seconds(info.encoded_time)}`
      : "no frames yet";
    timeline.dataset.frames = String(frames);
    timeline.dataset.time = String(info?.time ?? 0);

    // One lane per granularity, in legend order, holding the selected answer's spans.
    const lanes = timeline.querySelector(".lanes");
    lanes.replaceChildren();
    const byGranularity = new Map();
    for (const span of spans) {
      colourOf(span.granularity);
      if (!byGranularity.has(span.granularity)) byGranularity.set(span.granularity, []);
      byGranularity.get(span.granularity).push(span);
    }
    for (const [granularity, colour] of state.granularities) {
      const members = byGranularity.get(granularity);
      if (!members) continue;
      const lane = document.createElement("div");
      lane.className = "lane";
      lane.dataset.granularity = granularity;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = granularity;
      const bar = document.createElement("div");
      bar.className = "bar";
      for (const span of members) {
        const block = document.createElement("div");
        block.className = "span";
        block.dataset.granularity = granularity;
        block.dataset.firstFrame = String(span.first_frame);
        block.dataset.lastFrame = String(span.last_frame);
        block.style.left = percent(span.start_time);
        // A one-frame span has no length: CSS gives it a minimum width so that it still shows.
        block.style.width = percent(Math.max(0, Math.min(span.end_time, extent) - span.start_time));
        block.style.background = colour;
        block.title =
          `${granularity} · frames ${span.first_frame}–${span.last_frame} · ` +
          `${seconds(span.start_time)}–${seconds(span.end_time)}` +
          (Number.isFinite(span.score) ? ` · score ${span.score.toFixed(3)}` : "");
        bar.append(block);
      }
      lane.append(name, bar);
      lanes.append(lane);
    }
  }

  // -- wiring -----------------------------------------------------------------------------------
  async function connect(attempt = 1) {
    const status = $("server-status");
    try {
      const response = await fetch("/health/ready");
      const body = await response.json();
      status.textContent = response.ok ? `model ${body.model}` : `${body.error.code}: ${body.error.message}`;
      // Opened while the model loads: wait for it rather than show errors the user cannot act on.
      if (response.status === 503 && body.error.code === "model_loading" && attempt < READY_ATTEMPTS) {
        setTimeout(() => connect(attempt + 1), READY_RETRY_MS);
        return;
      }
    } catch (error) {
      status.textContent = `cannot reach the server: ${error.message}`;
    }
    // The first request tells whether the token is right: one notice, not one per request.
    if (!(await guarded("listing the video files", $("file-refresh"), loadSources))) return;
    // The token works now: notices that it did not are out of date.
    for (const notice of $("errors").querySelectorAll(".error[data-code=unauthorized]")) notice.remove();
    await guarded("listing the streams", null, refreshStreamList);
  }

  function submitted(formId, what, action) {
    const form = $(formId);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      guarded(what, form.querySelector("button[type=submit]"), action);
    });
  }

  function init() {
    submitted("file-form", "starting the file stream", async () => {
      const name = $("file-select").value;
      if (!name) throw new ApiError("invalid_request", "source: choose a file first", "source");
      const info = await createStream({ source: name, fps: number("file-fps"), speed: number("file-speed") });
      await showStream(info);
    });
    submitted("url-form", "opening the live URL", async () => {
      const url = $("url-input").value.trim();
      if (!url) throw new ApiError("invalid_request", "source: type a URL first", "source");
      const info = await createStream({ source: url, fps: number("url-fps") });
      await showStream(info);
    });
    submitted("webcam-form", "starting the webcam", startWebcam);
    submitted("question-form", "asking", ask);
    $("file-refresh").addEventListener("click", (event) =>
      guarded("listing the video files", event.currentTarget, loadSources),
    );
    $("stream-stop").addEventListener("click", (event) => guarded("stopping the stream", event.currentTarget, stopStream));
    // A token typed or pasted: read what it now lets the page see.
    $("token").addEventListener("change", () => connect());
    for (const granularity of Object.keys(GRANULARITY_COLOURS)) colourOf(granularity);
    render();
    connect();
  }

  init();
})();
