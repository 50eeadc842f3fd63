"""Run the study notebooks in JupyterLab, in a real headless Chromium, and check what a person sees.

    python scripts/browser_check.py                      # every notebook in notebooks/
    python scripts/browser_check.py --notebooks 00 01    # those whose names start with 00 or 01
    python scripts/browser_check.py --timeout 600 --port 8899

`make browser-check` installs what this needs (the `lab` and `browser` extras) and runs it.

The papermill pipeline and the tests check that the notebooks *execute*; this checks that they also
*show* their results in JupyterLab, the way people explore them: it starts JupyterLab at the
repository root, opens each notebook in Chromium through Playwright, runs all cells from the Run
menu, waits for the kernel to finish and then checks, per notebook:

- no cell shows an error (an `error` output: a traceback or a kit's one-line input error);
- every cell that shows a figure (its last line is a figure, or it calls `display(figure)`) shows
  a rendered image, and the notebook shows at least as many images as it saves with `save_figure(`;
- no output is a raw `<Figure size …>` text instead of the image;
- a cell with `interact(` sliders shows its widgets and an image, and the image changes when the
  first slider is dragged.

It writes a full-height screenshot of each notebook to runs/browser_check/<notebook>.png, the
results to runs/browser_check/report.json and JupyterLab's log to runs/browser_check/jupyterlab.log,
prints one verdict line per notebook and exits 1 if any notebook fails (2 if it could not check).

The notebooks run with their own defaults, exactly as after opening them and choosing Run All: they
write their runs and figures where those defaults say. The check never saves a notebook (autosave
is off and the server refuses saves), so the paired .ipynb/.py files are left as they were.

Chromium: Debian's `/usr/bin/chromium` (`apt-get install chromium`), or the path in the CHROMIUM
environment variable. Playwright only drives it; `playwright install` is not needed.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil  # installed with ipykernel

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright
except ImportError:  # main() says how to install it
    sync_playwright = None

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
INSTALL_CHROMIUM = "install it with 'apt-get install -y chromium' (Debian/Ubuntu) or set CHROMIUM=/path/to/chromium"
# Headless, and nothing that phones home: on a closed network Chromium's background services
# (component updates, sync, QUIC probes) otherwise stall or misbehave.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 1000}
MAX_SHOT_HEIGHT = 16000  # taller notebooks are screenshotted as several scrolled panels
POLL_S = 1.0
STABLE_POLLS = 3  # "finished" must hold this many polls in a row (the kernel idles between cells)
WIDGET_WAIT_S = 30  # widget outputs render after the cell's own execution finishes
RAW_FIGURE_TEXT = re.compile(r"<Figure size [^>]*>")

# JupyterLab user settings for the check, written to a temporary settings folder so the user's own
# settings and workspaces neither interfere nor change:
LAB_SETTINGS = {
    # Never write the notebooks: other people edit them, and jupytext would rewrite the .py too.
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    # Attach every cell to the page, so that off-screen outputs are rendered, counted and captured.
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    # No news or update toasts over the screenshots (and no requests to the internet).
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
}
# A second guard, in the server: any save request fails instead of touching a file.
SERVER_CONFIG = '''
def refuse_save(model, path, contents_manager, **kwargs):
    raise RuntimeError(f"browser_check: not saving {path} (the check never writes notebooks)")

c.ContentsManager.pre_save_hook = refuse_save
'''


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", nargs="*", default=[], metavar="PREFIX",
                        help="check only the notebooks whose names start with one of these, "
                             "or these .ipynb paths (default: every notebook in notebooks/)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds one notebook may run before it fails (default: 1800)")
    parser.add_argument("--port", type=int, default=0, help="JupyterLab's port (default: a free one)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "browser_check",
                        help="where screenshots and report.json go (default: runs/browser_check)")
    return parser.parse_args()


# --------------------------------------------------------------------------------------------------
# What each cell should show, read from its source.


def call_name(node: ast.AST) -> str | None:
    """`f` for a call `f(...)` or `module.f(...)`, else None."""
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name):
            return node.func.id
        if isinstance(node.func, ast.Attribute):
            return node.func.attr
    return None


@dataclass
class Expectation:
    saves: int = 0        # save_figure( calls: the notebook as a whole must show this many images
    shows: int = 0        # figures the cell displays (trailing `figure` line, display(figure) calls)
    interact: bool = False  # ipywidgets sliders whose output is a figure


def expectation(source: str) -> Expectation:
    """Count the figures a code cell saves and shows. A figure is a name the cell passes to
    save_figure or binds to a plot_*() call; a cell shows it as its last expression or through
    display(). Cells that do not parse (magics) expect nothing."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return Expectation()
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    figures = {c.args[0].id for c in calls
               if call_name(c) == "save_figure" and c.args and isinstance(c.args[0], ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and (call_name(node.value) or "").startswith("plot_"):
            figures |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    shown = sum(1 for c in calls if call_name(c) == "display" and c.args
                and isinstance(c.args[0], ast.Name) and c.args[0].id in figures)
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr) and isinstance(last.value, ast.Name) and last.value.id in figures:
        shown += 1
    decorators = [d for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                  for d in node.decorator_list]
    interact = any(call_name(node) in ("interact", "interactive") or
                   (isinstance(node, ast.Name) and node.id == "interact")
                   for node in [*calls, *decorators])
    return Expectation(saves=sum(1 for c in calls if call_name(c) == "save_figure"),
                       shows=shown, interact=interact)


def label(index: int, cell: dict, hint: str = "") -> str:
    """Which cell a problem is in, as a person finds it: its position (1-based, markdown cells
    counted), its prompt number and a quote, the line holding `hint` or else the first line that
    is not a comment. E.g. cell 7 [4] `figure = plot_gradient_share(curves)`."""
    lines = [line.strip() for line in cell["source"].splitlines() if line.strip()]
    quote = next((line for line in lines if hint and hint in line), None)
    quote = quote or next((line for line in lines if not line.startswith("#")), "")
    quote = quote if len(quote) <= 70 else quote[:67] + "..."
    prompt = f" [{cell['execution_count']}]" if cell.get("execution_count") is not None else ""
    return f"cell {index + 1}{prompt} `{quote}`"


# --------------------------------------------------------------------------------------------------
# JupyterLab: started at the repository root with throw-away settings, and always shut down.


class JupyterLab:
    def __init__(self, port: int, log_path: Path):
        self.token = secrets.token_hex(24)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.home = Path(tempfile.mkdtemp(prefix="llave-browser-check-"))
        self.process: subprocess.Popen | None = None

    def start(self, wait_s: float = 120) -> None:
        for relative, values in LAB_SETTINGS.items():
            path = self.home / "settings" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        (self.home / "config").mkdir()
        (self.home / "config" / "jupyter_server_config.py").write_text(SERVER_CONFIG)
        env = {**os.environ,
               "JUPYTER_TOKEN": self.token,  # through the environment: not visible in `ps`
               "JUPYTERLAB_SETTINGS_DIR": str(self.home / "settings"),
               "JUPYTERLAB_WORKSPACES_DIR": str(self.home / "workspaces"),
               # The user's jupyter config (a password, a default root dir...) must not apply;
               # the environment's own config (sys.prefix/etc/jupyter, extensions) still does.
               "JUPYTER_CONFIG_DIR": str(self.home / "config"),
               "JUPYTER_RUNTIME_DIR": str(self.home / "runtime"),
               "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "jupyterlab", "--no-browser",
                   "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
                   "--ServerApp.port_retries=0", f"--ServerApp.root_dir={REPO}",
                   # window.jupyterapp: the page's own notebook model, to tell an error output
                   # from stderr (both render alike) and to map each cell to its DOM node.
                   "--LabApp.expose_app_in_browser=True",
                   # JupyterLab checkpoints each notebook it opens: keep those copies out of the
                   # repository (an absolute folder replaces each notebook's .ipynb_checkpoints/).
                   f"--FileCheckpoints.checkpoint_dir={self.home / 'checkpoints'}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-root")  # containers and CI; it only listens on 127.0.0.1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        # A session of its own: Ctrl-C in the terminal reaches this script, which then shuts the
        # server down in order (kernels first) instead of the server dying mid-way.
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.process.returncode}; "
                                   f"see {self.log_path}")
            try:
                self.api("GET", "/api/status")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"JupyterLab did not answer on port {self.port} within {wait_s:.0f} s; "
                           f"see {self.log_path}")

    def api(self, method: str, path: str, timeout: float = 10):
        request = urllib.request.Request(self.url + path, method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        """Shut down every kernel of this server (they are all the check's own)."""
        for kernel in self.api("GET", "/api/kernels"):
            self.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=30)

    def stop(self) -> None:
        if self.process is None:
            return
        # Kernels run in sessions of their own, so remember them before the server goes: if the
        # polite shutdown fails they are ended one by one (psutil checks each is still the
        # process it was, so a reused process id is never hit).
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            children = []
        try:
            if self.process.poll() is None:
                self.shutdown_kernels()
                self.api("POST", "/api/shutdown")
                self.process.wait(timeout=20)
        except Exception:  # whatever went wrong, fall through to ending processes
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        for child in children:
            try:
                child.terminate()
            except psutil.Error:
                pass  # already gone
        for child in psutil.wait_procs(children, timeout=5)[1]:
            child.kill()
        self.process = None
        self.log.close()
        shutil.rmtree(self.home, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# In the page: JupyterLab's notebook panel, seen through its model and its DOM.

# Per cell: the model's type, source, execution count and outputs (types only: the images
# themselves stay in the page), and what the DOM shows: the prompt, rendered images, widgets and
# output texts. Cells are taken from the panel, so model and DOM node are the same cell.
READ_CELLS_JS = """(path) => {
  const panel = [...window.jupyterapp.shell.widgets('main')].find(w => w.context && w.context.path === path);
  if (!panel) return null;
  return panel.content.widgets.map(cell => {
    const model = cell.model;
    const area = cell.node.querySelector('.jp-Cell-outputArea');
    const images = area ? [...area.querySelectorAll('img')] : [];
    const prompt = cell.node.querySelector('.jp-InputArea-prompt');
    return {
      type: model.type,
      source: model.sharedModel.getSource(),
      execution_count: model.type === 'code' ? model.executionCount : null,
      prompt: prompt ? prompt.innerText.trim() : '',
      outputs: model.type === 'code' ? model.outputs.toJSON().map(o => ({
        output_type: o.output_type, name: o.name || null, ename: o.ename || null,
        evalue: o.evalue ? String(o.evalue).slice(0, 300) : null,
        mime_types: o.data ? Object.keys(o.data) : []})) : [],
      images: images.filter(i => i.complete && i.naturalWidth > 0).length,
      png_images: images.filter(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('data:image/png')).length,
      broken_images: images.filter(i => i.complete && i.naturalWidth === 0).length,
      widgets: area ? area.querySelectorAll('.widget-slider').length : 0,
      texts: area ? [...area.querySelectorAll('.jp-OutputArea-output')].map(o => o.innerText.slice(0, 300)) : [],
    };
  });
}"""

KERNEL_JS = """(path) => {
  const panel = [...window.jupyterapp.shell.widgets('main')].find(w => w.context && w.context.path === path);
  const kernel = panel && panel.sessionContext.session && panel.sessionContext.session.kernel;
  return kernel ? kernel.status : 'none';
}"""


def read_cells(page, path: str) -> list[dict]:
    cells = page.evaluate(READ_CELLS_JS, path)
    if cells is None:
        raise RuntimeError(f"JupyterLab has no open notebook panel for {path}")
    return cells


def kernel_status(page, path: str) -> str:
    return page.evaluate(KERNEL_JS, path)


def open_notebook(page, lab: JupyterLab, path: str) -> None:
    """Open the notebook in JupyterLab and wait until its kernel is idle."""
    # A workspace of its own, reset: JupyterLab would otherwise reopen the notebooks checked
    # before (and start kernels for them) from the workspace it saved.
    workspace = re.sub(r"[^A-Za-z0-9_-]", "-", Path(path).stem)
    page.goto(f"{lab.url}/lab/workspaces/{workspace}/tree/{urllib.parse.quote(path)}?reset&token={lab.token}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.started", timeout=120_000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
    # The file browser on the left takes a third of the screenshot: close it.
    page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
    try:
        page.wait_for_function(f"() => ({KERNEL_JS})({json.dumps(path)}) === 'idle'", timeout=120_000)
    except PlaywrightTimeout:
        raise RuntimeError(f"the notebook's kernel was not idle 120 s after opening it (status "
                           f"{kernel_status(page, path)!r}; a kernel dialog? see the screenshot)") from None


def run_all_cells(page, path: str) -> None:
    """Run > Run All Cells, as a person would. The item is found by its command id
    (`runmenu:run-all`, which runs the active notebook), not by its label."""
    # Make the notebook the active widget by clicking its tab (clicking into the notebook could
    # enter a cell's editor, or add a cell when it lands on the blank area below the last one).
    page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text=Path(path).name).first.click()
    page.click("#jp-menu-panel .lm-MenuBar-item:has-text('Run')")
    page.click(".lm-Menu-item[data-command='runmenu:run-all']")


def wait_until_finished(page, path: str, timeout: float, name: str) -> tuple[bool, list[dict]]:
    """Poll until no cell shows `[*]`, at least one cell ran and the kernel is idle, several polls
    in a row; or until timeout. Returns (finished, cells)."""
    start = time.monotonic()
    stable, last_note = 0, start
    while True:
        cells = read_cells(page, path)
        code = [c for c in cells if c["type"] == "code"]
        running = [i for i, c in enumerate(cells) if c["prompt"].startswith("[*]")]
        ran = [c for c in code if c["execution_count"] is not None]
        done = not running and ran and kernel_status(page, path) == "idle"
        stable = stable + 1 if done else 0
        if stable >= STABLE_POLLS:
            return True, cells
        now = time.monotonic()
        if now - start > timeout:
            return False, cells
        if now - last_note > 60:  # a sign of life on long studies
            where = f"cell {running[0] + 1} running" if running else "waiting"
            print(f"  {name}: {now - start:.0f} s, {len(ran)}/{len(code)} cells done, {where}", flush=True)
            last_note = now
        page.wait_for_timeout(POLL_S * 1000)


def wait_for_widget_images(page, path: str, expected: dict[int, Expectation]) -> list[dict]:
    """Widget outputs (interact) render after their cell has finished: give them a moment."""
    deadline = time.monotonic() + WIDGET_WAIT_S
    while True:
        cells = read_cells(page, path)
        pending = [i for i, e in expected.items() if e.interact and cells[i]["images"] == 0
                   and cells[i]["execution_count"] is not None]
        if not pending or time.monotonic() > deadline:
            return cells
        page.wait_for_timeout(500)


def drag_first_slider(page, path: str, index: int, where: str) -> str | None:
    """Drag the first slider of cell `index` with the mouse and wait for its image to change.
    Returns a problem, or None when the image changed."""
    cell = page.locator(".jp-NotebookPanel .jp-Cell").nth(index)
    handle = cell.locator(".widget-slider .noUi-handle").first
    readout = cell.locator(".widget-slider .widget-readout").first
    images = cell.locator(".jp-Cell-outputArea img")
    if handle.count() == 0 or images.count() == 0:
        return f"{where}: no slider handle or image to drag"
    value, before = readout.inner_text(), images.first.get_attribute("src")
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 60, y, steps=6)  # leftwards: any other value will do
    page.mouse.up()
    moved = readout.inner_text()
    if moved == value:
        return f"{where}: dragging the first slider did not move it (still {value})"
    deadline = time.monotonic() + WIDGET_WAIT_S
    while time.monotonic() < deadline:
        page.wait_for_timeout(500)
        if images.count() and images.first.get_attribute("src") not in (None, before) \
                and kernel_status(page, path) == "idle":
            return None
    return (f"{where}: the first slider moved ({value} -> {moved}) but the image did not change "
            f"within {WIDGET_WAIT_S} s")


def screenshot(page, out: Path, name: str) -> list[str]:
    """The whole notebook: the viewport is stretched to the notebook's height, so JupyterLab lays
    every cell out on screen; beyond MAX_SHOT_HEIGHT, scrolled panels <name>.2.png, ... follow."""
    scroller = ".jp-NotebookPanel .jp-WindowedPanel-outer"
    content = page.evaluate(f"() => document.querySelector('{scroller}').scrollHeight")
    chrome = VIEWPORT["height"] - page.evaluate(f"() => document.querySelector('{scroller}').clientHeight")
    height = min(content + chrome, MAX_SHOT_HEIGHT)
    page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
    page.wait_for_timeout(1000)  # relayout
    paths, offset, part = [], 0, 1
    while True:
        page.evaluate(f"(y) => document.querySelector('{scroller}').scrollTop = y", offset)
        page.wait_for_timeout(300)
        path = out / (f"{name}.png" if part == 1 else f"{name}.{part}.png")
        page.screenshot(path=str(path))
        paths.append(str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path))
        offset += height - chrome
        part += 1
        if offset >= content:
            break
    page.set_viewport_size(VIEWPORT)
    return paths


# --------------------------------------------------------------------------------------------------
# One notebook: open, run all, read what shows, judge.

INTERRUPTED = 0  # the signal that interrupted the run, if any


def raise_interrupt(signum, frame):
    # Remembered as well as raised: Ctrl-C also reaches Playwright's driver, and the error its
    # death causes inside a notebook's check must end the run, not count as that notebook failing.
    global INTERRUPTED
    INTERRUPTED = signum
    raise KeyboardInterrupt



@dataclass
class Result:
    notebook: str
    ok: bool = False
    seconds: float = 0.0
    images: int = 0
    figures_saved: int = 0
    errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    screenshots: list[str] = field(default_factory=list)


def judge(cells: list[dict], expected: dict[int, Expectation], result: Result) -> None:
    """Fill result.errors (error outputs) and result.problems (everything else that is wrong)."""
    for i, cell in enumerate(cells):
        if cell["type"] != "code":
            continue
        for output in cell["outputs"]:
            if output["output_type"] == "error":
                result.errors.append(f"{label(i, cell)}: {output['ename']}: {output['evalue']}")
        raw = [m.group(0) for text in cell["texts"] for m in RAW_FIGURE_TEXT.finditer(text)]
        if raw:
            result.problems.append(f"{label(i, cell, 'figure')} shows the text {raw[0]}"
                                   f"{f' (and {len(raw) - 1} more)' if len(raw) > 1 else ''} instead of an image")
        if cell["broken_images"]:
            result.problems.append(f"{label(i, cell)}: {cell['broken_images']} image(s) failed to load")
    # Empty cells never get a prompt number; a running cell is named by the timeout message.
    not_run = [i + 1 for i, c in enumerate(cells) if c["type"] == "code" and c["execution_count"] is None
               and c["source"].strip() and not c["prompt"].startswith("[*]")]
    if not_run:
        result.problems.append(f"cell{'s' if len(not_run) > 1 else ''} {', '.join(map(str, not_run))} did not run"
                               + (" (Run All stops at an error)" if result.errors else ""))
    for i, want in expected.items():
        cell = cells[i]
        if cell["execution_count"] is None:
            continue  # already reported as not run
        where = label(i, cell, "interact(" if want.interact else "figure")
        outputs = "; ".join(sorted({o["output_type"] + (f" ({', '.join(o['mime_types'])})" if o["mime_types"] else "")
                                    for o in cell["outputs"]})) or "no output"
        raw_text = any(RAW_FIGURE_TEXT.search(text) for text in cell["texts"])
        if want.shows and cell["images"] < want.shows and not raw_text:  # raw text: said above
            result.problems.append(f"{where} displays {want.shows} figure(s) but shows "
                                   f"{cell['images']} image(s); it has {outputs}")
        if want.interact and not cell["widgets"]:
            result.problems.append(f"{where}: no slider widgets rendered; it has {outputs}")
        elif want.interact and not cell["images"]:
            result.problems.append(f"{where}: the sliders' output shows no image; it has {outputs}")
    result.images = sum(c["png_images"] for c in cells)
    result.figures_saved = sum(e.saves for e in expected.values())
    if result.images < result.figures_saved:
        result.problems.append(f"{result.images} PNG image(s) shown, fewer than the "
                               f"{result.figures_saved} figure(s) the notebook saves")


def check_notebook(browser, lab: JupyterLab, notebook: Path, args) -> Result:
    path = notebook.relative_to(REPO).as_posix()
    result = Result(notebook.stem)
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    try:
        open_notebook(page, lab, path)
        # Expectations from the sources JupyterLab loaded (jupytext may have merged the .py).
        expected = {i: expectation(c["source"]) for i, c in enumerate(read_cells(page, path))
                    if c["type"] == "code"}
        expected = {i: e for i, e in expected.items() if e.saves or e.shows or e.interact}
        start = time.monotonic()
        run_all_cells(page, path)
        finished, cells = wait_until_finished(page, path, args.timeout, notebook.stem)
        result.seconds = round(time.monotonic() - start, 1)
        if not finished:
            running = [i for i, c in enumerate(cells) if c["prompt"].startswith("[*]")]
            result.problems.append(f"timed out after {args.timeout:.0f} s"
                                   + (f" in {label(running[0], cells[running[0]])}" if running else ""))
        else:
            cells = wait_for_widget_images(page, path, expected)
        judge(cells, expected, result)
        result.screenshots = screenshot(page, args.out, notebook.stem)
        sliders = [i for i, e in expected.items() if e.interact and cells[i]["images"]]
        if finished and sliders:
            problem = drag_first_slider(page, path, sliders[0], label(sliders[0], cells[sliders[0]], "interact("))
            if problem:
                result.problems.append(problem)
    except Exception as error:  # one notebook's failure must not stop the others
        if INTERRUPTED:
            raise KeyboardInterrupt from error
        result.problems.append(f"the check itself failed: {type(error).__name__}: {error}".split("\n")[0])
        try:
            result.screenshots = screenshot(page, args.out, notebook.stem)
        except Exception:
            pass
    finally:
        # Closing the page discards the unsaved outputs; the kernel is shut down before the next
        # notebook so two studies never compete for the CPU.
        for close in (context.close, lab.shutdown_kernels):
            try:
                close()
            except Exception:  # the browser may be gone (Ctrl-C); stop() retries kernels
                pass
    result.ok = not result.errors and not result.problems
    return result


def verdict(result: Result) -> str:
    head = f"{'ok  ' if result.ok else 'FAIL'} {result.notebook}: {result.seconds:.0f} s, " \
           f"{result.images} image(s) for {result.figures_saved} saved figure(s)"
    reasons = result.errors + result.problems
    return head if not reasons else head + "; " + "; ".join(reasons)


def main() -> int:
    args = parse_args()
    args.out = args.out.resolve()
    if not Path(CHROMIUM).is_file():
        print(f"browser-check: no Chromium at {CHROMIUM}: {INSTALL_CHROMIUM}", file=sys.stderr)
        return 2
    notebooks = sorted((REPO / "notebooks").glob("*.ipynb"))
    if args.notebooks:
        # A prefix picks from notebooks/; a path to an .ipynb inside the repository (JupyterLab
        # serves nothing outside it) is checked as it is, e.g. a scratch copy under runs/.
        paths = [Path(p).resolve() for p in args.notebooks if p.endswith(".ipynb")]
        outside = [str(p) for p in paths if not p.is_file() or not p.is_relative_to(REPO)]
        if outside:
            print(f"browser-check: not a notebook inside the repository: {', '.join(outside)}",
                  file=sys.stderr)
            return 2
        notebooks = [n for n in notebooks if any(n.name.startswith(p) for p in args.notebooks)]
        notebooks += [p for p in paths if p not in notebooks]
    if not notebooks:
        print(f"browser-check: no notebook matches {args.notebooks}", file=sys.stderr)
        return 2
    if sync_playwright is None:
        print('browser-check: Playwright is missing: pip install -e ".[lab,browser]" '
              "(or run make browser-check)", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the finally blocks shut JupyterLab
    # and its kernels down (the server runs in a session of its own and gets neither signal).
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGINT, raise_interrupt)
    lab = JupyterLab(args.port, args.out / "jupyterlab.log")
    results: list[Result] = []
    started = time.monotonic()
    try:
        lab.start()
        print(f"browser-check: JupyterLab at {lab.url} (root {REPO.name}/), "
              f"{len(notebooks)} notebook(s), up to {args.timeout:.0f} s each", flush=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                for notebook in notebooks:
                    print(f"  {notebook.stem}: running all cells...", flush=True)
                    results.append(check_notebook(browser, lab, notebook, args))
                    print(verdict(results[-1]), flush=True)
            finally:
                browser.close()
    except KeyboardInterrupt:
        print("browser-check: interrupted; shutting JupyterLab and its kernels down", file=sys.stderr)
        return 128 + (INTERRUPTED or signal.SIGINT)  # the shell's way: 130 Ctrl-C, 143 SIGTERM
    except Exception as error:  # JupyterLab or Chromium did not start
        print(f"browser-check: could not check: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    finally:
        lab.stop()
        report = {"seconds": round(time.monotonic() - started, 1), "chromium": CHROMIUM,
                  "interrupted": bool(INTERRUPTED),
                  "ok": bool(results) and all(r.ok for r in results) and len(results) == len(notebooks),
                  "notebooks": {r.notebook: asdict(r) for r in results}}
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    failed = [r.notebook for r in results if not r.ok]
    print(f"browser-check: {len(results) - len(failed)}/{len(results)} notebook(s) ok in "
          f"{report['seconds']:.0f} s; screenshots and report.json in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
