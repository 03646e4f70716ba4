// Tuberunner dashboard: polls the coordinator's admin and ingest APIs with the admin token and shows
// runners, jobs and videos. Everything from the server is inserted as text (textContent, Text nodes,
// attributes), never parsed as HTML: job errors, runner and video names are other people's text.
"use strict";

(() => {
  const API_ROOT = new URL("../", document.baseURI); // the coordinator's root, behind a path prefix too
  const TOKEN_KEY = "tuberunner.adminToken";
  const POLL_MS = 2000;
  const PAGE = 50;
  const HLS_SCRIPT = "vendor/hls.min.js";

  const STATES = {
    1: "Pending",
    2: "Processing",
    3: "Completed",
    4: "Errored",
    5: "Waiting for parent",
    6: "Cancelled",
    7: "Parent errored",
    8: "Parent cancelled",
    9: "Completing",
  };
  const ACTIVE_STATES = [1, 2, 5, 9];
  const CANCELLABLE = new Set([1, 2, 5]);
  const JOB_TYPES = [
    "vod-web-video-transcoding",
    "vod-hls-transcoding",
    "vod-audio-merge-transcoding",
    "live-rtmp-hls-transcoding",
    "video-studio-transcoding",
    "video-transcription",
    "generate-video-storyboard",
  ];

  const $ = (selector) => document.querySelector(selector);

  class Unauthorized extends Error {}

  // ------------------------------------------------------------------ DOM helpers (text only)

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child); // strings become Text nodes
    }
    return node;
  }

  function setText(node, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  // Rebuild a cell's children only when what they show changed, so that links and buttons under the
  // pointer survive the polls that change nothing.
  function setContent(node, signature, build) {
    if (node.dataset.signature === signature) return;
    node.dataset.signature = signature;
    node.replaceChildren(...build().filter((child) => child !== null && child !== undefined));
  }

  // Keyed rows: a row is created once per key and updated in place; rows whose key is gone are removed.
  function syncRows(tbody, items, keyOf, create, update) {
    const existing = new Map();
    for (const row of tbody.rows) existing.set(row.dataset.key, row);
    let previous = null;
    for (const item of items) {
      const key = String(keyOf(item));
      let row = existing.get(key);
      if (row === undefined) {
        row = create(item);
        row.dataset.key = key;
      }
      existing.delete(key);
      update(row, item);
      const expected = previous === null ? tbody.firstElementChild : previous.nextElementSibling;
      if (row !== expected) tbody.insertBefore(row, expected);
      previous = row;
    }
    for (const row of existing.values()) row.remove();
    const section = tbody.closest("section");
    section.querySelector(".empty").hidden = items.length > 0;
    tbody.closest("table").hidden = items.length === 0;
  }

  function cells(row, count) {
    for (let i = 0; i < count; i += 1) row.append(el("td"));
    return row.cells;
  }

  function safeUrl(value) {
    if (typeof value !== "string") return null;
    try {
      const url = new URL(value, API_ROOT);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch {
      return null;
    }
  }

  // ------------------------------------------------------------------ formatting

  const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

  function ago(iso) {
    if (!iso) return "never";
    const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return dateFormat.format(new Date(iso));
  }

  function clock(iso) {
    return iso ? timeFormat.format(new Date(iso)) : "";
  }

  function bytes(size) {
    if (typeof size !== "number") return "";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let value = size;
    let unit = 0;
    while (value >= 1000 && unit < units.length - 1) {
      value /= 1000;
      unit += 1;
    }
    return `${value.toFixed(value < 10 && unit > 0 ? 1 : 0)} ${units[unit]}`;
  }

  function shortType(type) {
    return String(type).replace(/-transcoding$/, "").replace(/^vod-/, "");
  }

  function stateBadge(id, label) {
    return el("span", { class: `badge state-${id}`, text: label ?? STATES[id] ?? String(id) });
  }

  // ------------------------------------------------------------------ API

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  async function problemText(response) {
    try {
      const body = await response.json();
      return String(body.detail ?? body.error ?? response.statusText);
    } catch {
      return response.statusText;
    }
  }

  async function api(path, { method = "GET", params = [] } = {}) {
    const url = new URL(path, API_ROOT);
    for (const [name, value] of params) url.searchParams.append(name, value);
    const response = await fetch(url, {
      method,
      headers: { Authorization: `Bearer ${token()}`, Accept: "application/json" },
      cache: "no-store",
    });
    if (response.status === 401) throw new Unauthorized(await problemText(response));
    if (!response.ok) {
      throw new Error(`${method} ${url.pathname}: ${response.status} ${await problemText(response)}`);
    }
    return response.status === 204 ? null : response.json();
  }

  function jobParams() {
    const params = [["count", String(PAGE)], ["sort", "-createdAt"]];
    const state = $("#job-state").value;
    if (state === "active") for (const id of ACTIVE_STATES) params.push(["stateOneOf", String(id)]);
    else if (state) params.push(["stateOneOf", state]);
    const type = $("#job-type").value;
    if (type) params.push(["typeOneOf", type]);
    return params;
  }

  // ------------------------------------------------------------------ rendering

  const videoNames = new Map(); // video uuid → name, from the last videos page

  function renderRunners(runners, processing) {
    const held = new Map();
    for (const job of processing.data) {
      if (!job.runner) continue;
      if (!held.has(job.runner.id)) held.set(job.runner.id, []);
      held.get(job.runner.id).push(job);
    }
    setText($("#runners-count"), runners.total);
    syncRows(
      $("#runners tbody"),
      runners.data,
      (runner) => runner.id,
      () => {
        const row = el("tr");
        cells(row, 5);
        return row;
      },
      (row, runner) => {
        const [name, version, address, contact, current] = row.cells;
        setContent(name, JSON.stringify([runner.name, runner.description]), () => [
          el("strong", { text: runner.name }),
          runner.description ? el("div", { class: "hint", text: runner.description }) : null,
        ]);
        setText(version, runner.version ?? "");
        setText(address, runner.ip ?? "");
        setText(contact, ago(runner.lastContact));
        contact.title = runner.lastContact ?? "";
        const jobs = held.get(runner.id) ?? [];
        setContent(current, JSON.stringify(jobs.map((j) => [j.uuid, j.type, j.progress])), () =>
          jobs.length === 0
            ? [el("span", { class: "hint", text: "idle" })]
            : jobs.map((job) =>
                el(
                  "div",
                  { class: "current-job", dataset: { job: job.uuid } },
                  `${shortType(job.type)} `,
                  el("span", { class: "pct", text: `${job.progress ?? 0}%` }),
                ),
              ),
        );
      },
    );
  }

  function renderUnclaimed(unclaimed) {
    const box = $("#unclaimed");
    box.hidden = unclaimed.total === 0;
    setText($("#unclaimed-count"), unclaimed.total);
    setContent($("#unclaimed-list"), JSON.stringify(unclaimed.data), () =>
      unclaimed.data.map((job) =>
        el(
          "li",
          { dataset: { job: job.uuid } },
          el("strong", { text: job.type }),
          ` of ${job.videoUUID ? (videoNames.get(job.videoUUID) ?? job.videoUUID.slice(0, 8)) : "no video"}, unclaimed since ${clock(job.unclaimedSince)}: `,
          job.fallback === "coordinator" ? "the coordinator makes it itself" : "it waits for a runner that takes this type",
        ),
      ),
    );
  }

  function renderJobs(jobs) {
    setText($("#jobs-count"), jobs.total > jobs.data.length ? `${jobs.data.length} of ${jobs.total}` : jobs.total);
    syncRows(
      $("#jobs tbody"),
      jobs.data,
      (job) => job.uuid,
      (job) => {
        const row = el("tr", { dataset: { job: job.uuid } });
        cells(row, 9);
        const [, , progress, , , , error, , actions] = row.cells;
        progress.append(el("progress", { max: 100 }), el("span", { class: "pct" }));
        error.className = "error-text";
        actions.append(el("button", { type: "button", class: "cancel danger", dataset: { job: job.uuid }, text: "Cancel" }));
        return row;
      },
      (row, job) => {
        const [type, state, progress, runner, video, failures, error, updated, actions] = row.cells;
        setText(type, job.type);
        type.title = job.uuid;
        setContent(state, `${job.state.id} ${job.unclaimedSince ?? ""}`, () => [
          stateBadge(job.state.id, job.state.label),
          job.unclaimedSince
            ? el("span", {
                class: "badge unclaimed",
                title: `No connected runner has taken ${job.type} jobs since ${job.unclaimedSince}`,
                text: "unclaimed",
              })
            : null,
        ]);
        row.dataset.state = String(job.state.id);
        const bar = progress.querySelector("progress");
        const value = job.state.id === 3 ? 100 : job.progress;
        if (value === null || value === undefined) bar.removeAttribute("value");
        else bar.value = value;
        bar.hidden = job.state.id !== 2 && job.state.id !== 9;
        setText(progress.querySelector(".pct"), value === null || value === undefined ? "" : `${value}%`);
        setText(runner, job.runner ? job.runner.name : "");
        const videoUuid = job.privatePayload ? job.privatePayload.videoUUID : null;
        setText(video, videoUuid ? (videoNames.get(videoUuid) ?? videoUuid.slice(0, 8)) : "");
        video.title = videoUuid ?? "";
        setText(failures, job.failures || "");
        setText(error, job.error ?? "");
        error.title = job.error ?? "";
        setText(updated, clock(job.updatedAt));
        updated.title = job.updatedAt ?? "";
        const cancel = actions.querySelector("button");
        cancel.hidden = !CANCELLABLE.has(job.state.id);
      },
    );
  }

  function liveDetails(live) {
    // Viewers' URL, where publishers push (the stream key stays in the API: it is a secret), lag.
    const found = [];
    const hlsUrl = safeUrl(live.hlsUrl);
    if (hlsUrl) found.push(el("a", { href: hlsUrl, class: "output live-hls", text: "live HLS" }));
    found.push(el("span", { class: "rtmp", title: "RTMP URL for publishers (with the stream key)", text: live.rtmpUrl }));
    const facts = [];
    if (live.state === "live") facts.push(live.publisherConnected ? "publisher connected" : "publisher away");
    if (typeof live.lagSeconds === "number") facts.push(`lag ${live.lagSeconds.toFixed(1)} s`);
    if (live.saveReplay) facts.push("replay saved");
    if (live.permanentLive) facts.push("permanent");
    if (facts.length) found.push(el("div", { class: "hint live-facts", text: facts.join(" · ") }));
    if (live.error) found.push(el("div", { class: "error-text", text: live.error }));
    return found;
  }

  function outputLinks(video) {
    const outputs = video.outputs ?? {};
    if (video.live) return liveDetails(video.live);
    const links = [];
    if (outputs.hls && safeUrl(outputs.hls.masterPlaylistUrl)) {
      links.push(el("a", { href: safeUrl(outputs.hls.masterPlaylistUrl), class: "output", text: "HLS" }));
    }
    for (const web of outputs.webVideos ?? []) {
      const href = safeUrl(web.url);
      if (href) links.push(el("a", { href, class: "output", title: bytes(web.size), text: `${web.resolution}p MP4` }));
    }
    for (const caption of outputs.captions ?? []) {
      const href = safeUrl(caption.url);
      if (href) links.push(el("a", { href, class: "output", text: `captions ${caption.language ?? ""}`.trim() }));
    }
    for (const storyboard of outputs.storyboards ?? []) {
      const href = safeUrl(storyboard.url);
      if (href) links.push(el("a", { href, class: "output", text: "storyboard" }));
    }
    return links;
  }

  // Storyboard and captions that are not there yet (or never will be): they never hold a video back.
  function attachmentNotes(video) {
    return (video.attachments ?? [])
      .filter((attachment) => attachment.state !== "done")
      .map((attachment) =>
        el("span", {
          class: `attachment attachment-${attachment.state}${attachment.unclaimedSince ? " unclaimed" : ""}`,
          dataset: { kind: attachment.kind },
          title: attachment.unclaimedSince ? `No connected runner takes this job since ${attachment.unclaimedSince}` : null,
          text: `${attachment.kind} ${attachment.unclaimedSince ? "unclaimed" : attachment.state}`,
        }),
      );
  }

  function playable(video) {
    const outputs = video.outputs ?? {};
    if (video.live) return video.live.state === "live" || (video.live.state !== "waiting" && video.live.session > 0);
    return Boolean((outputs.hls && outputs.hls.masterPlaylistUrl) || (outputs.webVideos ?? []).length);
  }

  const videosByUuid = new Map();

  function renderVideos(videos) {
    videoNames.clear();
    videosByUuid.clear();
    for (const video of videos.data) {
      videoNames.set(video.uuid, video.name);
      videosByUuid.set(video.uuid, video);
    }
    setText($("#videos-count"), videos.total > videos.data.length ? `${videos.data.length} of ${videos.total}` : videos.total);
    syncRows(
      $("#videos tbody"),
      videos.data,
      (video) => video.uuid,
      (video) => {
        const row = el("tr", { dataset: { video: video.uuid } });
        cells(row, 6);
        row.cells[5].append(el("button", { type: "button", class: "play", dataset: { video: video.uuid }, text: "Play" }));
        return row;
      },
      (row, video) => {
        const [name, state, jobs, outputs, created, actions] = row.cells;
        setContent(name, JSON.stringify([video.name, video.error]), () => [
          el("strong", { text: video.name }),
          video.error ? el("div", { class: "error-text", text: video.error }) : null,
        ]);
        name.title = video.uuid;
        row.dataset.state = video.state;
        setContent(state, video.state, () => [el("span", { class: `badge video-${video.state}`, text: video.state })]);
        const byState = video.jobs ? video.jobs.byState : {};
        setText(
          jobs,
          Object.entries(byState ?? {})
            .map(([name, count]) => `${count} ${name.replaceAll("_", " ")}`)
            .join(", "),
        );
        setContent(outputs, JSON.stringify([video.outputs ?? null, video.attachments ?? []]), () => [
          ...outputLinks(video),
          ...attachmentNotes(video),
        ]);
        setText(created, video.createdAt ? dateFormat.format(new Date(video.createdAt)) : "");
        actions.querySelector("button").disabled = !playable(video);
      },
    );
  }

  // ------------------------------------------------------------------ polling

  let pollTimer = 0;
  let requested = 0; // refreshes started
  let shown = 0; // the newest refresh rendered: an older one finishing later is dropped

  async function refresh() {
    const mine = ++requested;
    const [runners, jobs, processing, videos, unclaimed] = await Promise.all([
      api("api/v1/runners", { params: [["count", "100"], ["sort", "createdAt"]] }),
      api("api/v1/runners/jobs", { params: jobParams() }),
      api("api/v1/runners/jobs", { params: [["count", "100"], ["stateOneOf", "2"]] }),
      api("api/v1/videos", { params: [["count", "20"], ["sort", "-createdAt"]] }),
      api("api/v1/runners/jobs/unclaimed", { params: [["count", "20"]] }),
    ]);
    if (mine < shown) return;
    shown = mine;
    renderVideos(videos); // first: job rows show video names
    renderRunners(runners, processing);
    renderUnclaimed(unclaimed);
    renderJobs(jobs);
    setStatus("live", `Live · updated ${timeFormat.format(new Date())}`);
  }

  function schedule(delayMs) {
    clearTimeout(pollTimer);
    pollTimer = setTimeout(tick, delayMs);
  }

  async function tick() {
    if (!token()) return;
    try {
      await refresh();
    } catch (error) {
      if (error instanceof Unauthorized) {
        signOut(`The coordinator refused the token: ${error.message}`);
        return;
      }
      setStatus("down", `Cannot reach the coordinator (${error.message}); retrying`);
    }
    schedule(document.hidden ? POLL_MS * 5 : POLL_MS);
  }

  function setStatus(kind, text) {
    const status = $("#status");
    status.dataset.kind = kind;
    setText(status, text);
  }

  // ------------------------------------------------------------------ actions

  async function cancelJob(button) {
    const row = button.closest("tr");
    const type = row.cells[0].textContent;
    if (!window.confirm(`Cancel this ${type} job? Its runner stops it, and the jobs that depend on it are cancelled too.`)) {
      return;
    }
    button.disabled = true;
    try {
      await api(`api/v1/runners/jobs/${encodeURIComponent(button.dataset.job)}/cancel`, { method: "POST" });
      await refresh();
    } catch (error) {
      if (error instanceof Unauthorized) signOut(error.message);
      else setStatus("down", `Cancel failed: ${error.message}`);
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------------ player

  let hls = null;
  let hlsLoading = null;

  function loadHls() {
    if (window.Hls) return Promise.resolve(window.Hls);
    if (hlsLoading === null) {
      hlsLoading = new Promise((resolve, reject) => {
        const script = el("script", { src: HLS_SCRIPT });
        script.addEventListener("load", () => resolve(window.Hls));
        script.addEventListener("error", () => {
          hlsLoading = null;
          reject(new Error("hls.js could not be loaded"));
        });
        document.head.append(script);
      });
    }
    return hlsLoading;
  }

  function stopPlayer() {
    const video = $("#player-video");
    if (hls !== null) {
      hls.destroy();
      hls = null;
    }
    video.removeAttribute("src");
    video.load();
    delete video.dataset.engine;
    $("#player").hidden = true;
  }

  async function play(videoUuid) {
    const found = videosByUuid.get(videoUuid);
    if (!found) return;
    stopPlayer();
    const video = $("#player-video");
    const note = $("#player-note");
    const master = found.live
      ? safeUrl(found.live.hlsUrl)
      : found.outputs.hls
        ? safeUrl(found.outputs.hls.masterPlaylistUrl)
        : null;
    const kind = found.live ? "live HLS" : "HLS";
    const mp4 = (found.outputs.webVideos ?? []).map((w) => safeUrl(w.url)).find(Boolean) ?? null;
    $("#player").hidden = false;
    setText($("#player-title"), found.name);
    setText(note, "");
    const mse = "MediaSource" in window || "ManagedMediaSource" in window;
    try {
      if (master && mse) {
        const Hls = await loadHls();
        if (!Hls.isSupported()) throw new Error("this browser cannot play HLS with hls.js");
        // A live: start near the live edge, and keep retrying playlists that are not there yet.
        hls = new Hls({ enableWorker: false, liveSyncDurationCount: 2, manifestLoadingMaxRetry: 10 });
        hls.on(Hls.Events.ERROR, (_event, data) => {
          if (data.fatal) setText(note, `Playback error: ${data.type} / ${data.details}`);
        });
        hls.loadSource(master);
        hls.attachMedia(video);
        video.dataset.engine = "hls.js";
        setText(note, `${kind} (hls.js)`);
      } else if (master && video.canPlayType("application/vnd.apple.mpegurl")) {
        video.src = master;
        video.dataset.engine = "native";
        setText(note, `${kind} (native)`);
      } else if (mp4) {
        video.src = mp4;
        video.dataset.engine = "mp4";
        setText(note, "MP4");
      } else {
        setText(note, "Nothing this browser can play.");
        return;
      }
      await video.play().catch(() => undefined); // autoplay may be refused; the controls remain
    } catch (error) {
      setText(note, error.message);
    }
  }

  // ------------------------------------------------------------------ sign in / out

  function showBoard(visible) {
    $("#board").hidden = !visible;
    $("#login").hidden = visible;
    $("#sign-out").hidden = !visible;
  }

  function signOut(message) {
    clearTimeout(pollTimer);
    sessionStorage.removeItem(TOKEN_KEY);
    stopPlayer();
    showBoard(false);
    setStatus("", "");
    setText($("#login-error"), message ?? "");
    $("#token").value = "";
    $("#token").focus();
  }

  async function signIn(value) {
    sessionStorage.setItem(TOKEN_KEY, value);
    setText($("#login-error"), "");
    try {
      await refresh();
    } catch (error) {
      if (error instanceof Unauthorized) {
        signOut(`The coordinator refused the token: ${error.message}`);
        return;
      }
      setStatus("down", `Cannot reach the coordinator (${error.message}); retrying`);
    }
    showBoard(true);
    schedule(POLL_MS);
  }

  // ------------------------------------------------------------------ start

  function start() {
    const stateSelect = $("#job-state");
    for (const [id, label] of Object.entries(STATES)) stateSelect.append(el("option", { value: id, text: label }));
    const typeSelect = $("#job-type");
    for (const type of JOB_TYPES) typeSelect.append(el("option", { value: type, text: type }));
    for (const select of [stateSelect, typeSelect]) {
      select.addEventListener("change", () => {
        clearTimeout(pollTimer);
        tick();
      });
    }

    $("#login").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("#token").value.trim();
      if (value) signIn(value);
    });
    $("#sign-out").addEventListener("click", () => signOut(""));
    $("#jobs tbody").addEventListener("click", (event) => {
      const button = event.target.closest("button.cancel");
      if (button) cancelJob(button);
    });
    $("#videos tbody").addEventListener("click", (event) => {
      const button = event.target.closest("button.play");
      if (button) play(button.dataset.video);
    });
    $("#player-close").addEventListener("click", stopPlayer);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && token() && !$("#board").hidden) {
        clearTimeout(pollTimer);
        tick();
      }
    });

    if (token()) signIn(token());
    else signOut("");
  }

  start();
})();
