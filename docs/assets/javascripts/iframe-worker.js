// Search from disk. The theme runs its search index in a Web Worker, and browsers refuse to start a worker from
// a file:// page, so opened from disk the search box would stay on "Initializing search". On file:// pages only,
// this stand-in for `Worker` loads the worker's script into a hidden iframe of the same page and passes the
// messages both ways; served over http(s) it does nothing. (mkdocs.yml lists it under extra.polyfills; the
// offline plugin would otherwise load a shim from a CDN, and the site loads nothing from the network.)
(function () {
  "use strict";
  if (location.protocol !== "file:") return;

  class FrameWorker extends EventTarget {
    constructor(url) {
      super();
      this.pending = [];
      this.frame = document.createElement("iframe");
      this.frame.hidden = true;
      document.body.appendChild(this.frame);
      const win = this.frame.contentWindow;
      // The worker script calls the global postMessage / addEventListener("message"): route them to us.
      // Messages are copied, as between a page and a real worker (and so each side gets its own realm's objects).
      win.postMessage = (data) => this.dispatchEvent(new MessageEvent("message", { data: structuredClone(data) }));
      const script = win.document.createElement("script");
      script.src = new URL(url, document.baseURI).href;
      script.onload = () => {
        const queued = this.pending;
        this.pending = null;
        queued.forEach((data) => this.postMessage(data));
      };
      script.onerror = () => this.dispatchEvent(new Event("error"));
      win.document.head.appendChild(script);
    }

    postMessage(data) {
      if (this.pending) {
        this.pending.push(data);
        return;
      }
      const win = this.frame.contentWindow;
      win.dispatchEvent(new win.MessageEvent("message", { data: win.structuredClone(data) }));
    }

    terminate() {
      this.frame.remove();
    }
  }

  window.Worker = FrameWorker;
})();
