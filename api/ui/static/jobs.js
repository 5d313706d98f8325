/* The jobs table, live: the server sends the page's rows again whenever they change. */
(function () {
  "use strict";
  const body = document.getElementById("job-rows");
  const live = document.getElementById("live");
  if (!body || !window.EventSource) return;
  const source = new EventSource(body.dataset.stream);
  source.addEventListener("rows", msg => {
    body.innerHTML = JSON.parse(msg.data).html;  // rendered and escaped by the server's template
    live.classList.add("on");
  });
  source.onerror = () => live.classList.remove("on");
})();
