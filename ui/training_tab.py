"""The Training tab: the paper's three-stage recipe on the user's data. A form for a new run (data, stages,
settings with the presets shown by "Check data"), and the runs: progress, a loss plot per stage, the log,
stop / resume, and "Chat with this checkpoint". The runs themselves belong to `app.training_runs`; this tab
only shows them. For the local owner only (the share-link accounts will not see it).
"""

from __future__ import annotations

import math

import gradio as gr
import pandas as pd

from app import viewer
from app.services import USER_ERRORS, Services
from app.training_runs import RunRequest, TrainingError, TrainingRun
from engine.training.loop import TrainingError as EngineTrainingError

from .common import QUIET, guard, hide, show

STAGE_CHOICES = [("1 · adaptor warm-up", 1), ("2 · joint VL pretraining", 2), ("3 · supervised fine-tuning", 3)]
TUNING_CHOICES = [("all weights of the stage", "full"), ("LoRA", "lora"), ("QLoRA (4-bit + LoRA)", "qlora")]
POLL_S = 2.0


class TrainingTab:
    def __init__(self, services: Services):
        self.runs, self.models, self.history = services.training, services.models, services.history
        self.data_dir = services.training.runs_dir / "datasets"
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, elem_id="training-form"):
                self._build_form()
            with gr.Column(scale=3, elem_id="training-runs"):
                self._build_runs()
        self.timer = gr.Timer(POLL_S, active=False)

    def _build_form(self) -> None:
        gr.Markdown("### New run")
        self.model = gr.Textbox(label="Start from (checkpoint directory or hub id)", max_lines=1,
                                value=str(self.models.source), elem_id="train-model")
        self.data = gr.Textbox(label="Conversation data (JSONL, LLaVA JSON or messages JSONL; one file per line)",
                               lines=2, elem_id="train-data")
        self.text_data = gr.Textbox(label="Text-only data for stage 2 (optional; .jsonl or .txt, one per line)",
                                    lines=1, elem_id="train-text-data")
        with gr.Accordion("Use my chats as data", open=False, elem_id="train-my-chats"):
            self.chats = gr.CheckboxGroup(label="Conversations", choices=[], elem_id="train-chats")
            self.export_btn = gr.Button("Export as training data", size="sm", elem_id="train-export-btn")
        self.stages = gr.CheckboxGroup(STAGE_CHOICES, value=[1, 2, 3], label="Stages", elem_id="train-stages")
        with gr.Row():
            self.steps = _preset_field("Steps per stage", "train-steps", "empty: Table 4 scaled to the data")
            self.batch_size = _preset_field("Batch size", "train-batch")
            self.lr = _preset_field("Learning rate", "train-lr", "empty: 1e-3 / 3e-5 / 2e-5")
        with gr.Row():
            self.warmup = _preset_field("Warm-up steps", "train-warmup")
            self.seed = gr.Number(label="Seed", precision=0, value=0, elem_id="train-seed")
            self.save_every = gr.Number(label="Checkpoint every N steps", precision=0, minimum=1, value=50,
                                        elem_id="train-save-every")
        self.tuning = gr.Radio(TUNING_CHOICES, value="full", label="What trains", elem_id="train-tuning")
        self.skip_bad = gr.Checkbox(label="Leave out bad samples instead of refusing the data", elem_id="train-skip")
        with gr.Row():
            self.check_btn = gr.Button("Check data and plan", elem_id="train-check-btn")
            self.start_btn = gr.Button("Start training", variant="primary", elem_id="train-start-btn")
        self.plan = gr.Markdown("", elem_id="train-plan")

    def _build_runs(self) -> None:
        gr.Markdown("### Runs")
        self.run_picker = gr.Dropdown(label="Run", choices=[], value=None, elem_id="train-run")
        self.status = gr.Markdown("", elem_id="train-status")
        self.plot = gr.LinePlot(x="step", y="loss", color="stage", title="Loss", height=260, elem_id="train-plot")
        self.log_scale = gr.Checkbox(label="log scale", elem_id="train-log-scale")
        with gr.Row():
            self.stop_btn = gr.Button("■ Stop (saves a checkpoint)", variant="stop", elem_id="train-stop-btn")
            self.resume_btn = gr.Button("↻ Resume", elem_id="train-resume-btn")
            self.chat_btn = gr.Button("Chat with this checkpoint", variant="primary", elem_id="train-chat-btn")
        self.notice = gr.HTML("", visible=False, elem_id="train-notice")
        self.log = gr.Textbox(label="Log", lines=10, max_lines=10, interactive=False, elem_id="train-log",
                              autoscroll=True)

    # ------------------------------------------------------------------ the form
    def request(self, model, data, text_data, stages, steps, batch, lr, warmup, seed, save_every, tuning, skip):
        return RunRequest(model=(model or "").strip(), data=_lines(data), text_data=_lines(text_data),
                          stages=sorted(int(s) for s in stages or ()), steps=_number(steps, "Steps per stage"),
                          batch_size=_number(batch, "Batch size"), lr=_number(lr, "Learning rate", whole=False),
                          warmup_steps=_number(warmup, "Warm-up steps"), seed=_number(seed, "Seed"),
                          save_every=_number(save_every, "Checkpoint every N steps"), tuning=tuning,
                          skip_bad=bool(skip))

    @property
    def form(self) -> list:
        return [self.model, self.data, self.text_data, self.stages, self.steps, self.batch_size, self.lr, self.warmup,
                self.seed, self.save_every, self.tuning, self.skip_bad]

    def check(self, *values):
        try:
            plan = self.request(*values).plan()
        except (*USER_ERRORS, EngineTrainingError) as e:  # DataError (a ValueError) carries the file:line report
            return {self.plan: f"**The data or settings cannot be used:**\n\n```\n{e}\n```"}
        return {self.plan: plan_markdown(plan), **hide(self.notice)}

    def start(self, *values):
        run = self.runs.start(self.request(*values))
        return {**self.show_run(run.id), self.timer: gr.Timer(active=True),
                **show(self.notice, f"Started run {run.id}.", "info")}

    def export_chats(self, conversation_ids, data):
        from datetime import datetime

        from engine.training.data import export_conversations

        viewer.require_owner("prepare training data")
        if not conversation_ids:
            return show(self.notice, "Tick the conversations to export first.", "info")
        conversations = []
        for cid in conversation_ids:
            conversation = self.history.get(cid)
            if conversation:
                conversations.append([{"role": m.role, "text": m.text, "images": [a.path for a in m.attachments]}
                                      for m in conversation.messages])
        folder = self.data_dir / datetime.now().strftime("chats-%Y%m%d-%H%M%S")
        path = export_conversations(conversations, folder)
        return {self.data: "\n".join([*_lines(data), str(path)]),
                **show(self.notice, f"Exported {len(conversations)} conversation(s) to {path}.", "info")}

    # ------------------------------------------------------------------ the runs
    def show_run(self, run_id: str | None, log_scale: bool = False) -> dict:
        runs = self.runs.list()
        choices = [(f"{r.created_at[:19].replace('T', ' ')} · {r.status} · stages "
                    f"{','.join(map(str, r.request.stages))}", r.id) for r in runs]
        run = next((r for r in runs if r.id == run_id), runs[0] if runs else None)
        if run is None:
            return {self.run_picker: gr.update(choices=[], value=None), self.status: "No runs yet.",
                    self.plot: None, self.log: "", self.timer: gr.Timer(active=False)}
        metrics = self.runs.metrics(run.id)
        return {self.run_picker: gr.update(choices=choices, value=run.id),
                self.status: status_markdown(run, metrics), self.plot: loss_frame(metrics, log_scale),
                self.log: self.runs.log_tail(run.id), self.timer: gr.Timer(active=run.status == "running")}

    def stop(self, run_id):
        self.runs.stop(run_id)
        return show(self.notice, "Stopping after the current step; a checkpoint is saved, Resume continues.", "info")

    def resume(self, run_id, log_scale):
        run = self.runs.resume(run_id)
        return {**self.show_run(run.id, log_scale), **show(self.notice, "Resumed from the last checkpoint.", "info")}

    def chat_with(self, run_id):
        run = self.runs.get(run_id)
        if not run.final:
            return show(self.notice, "This run has no finished checkpoint yet.", "info")
        self.chat.switch_model(run.final)
        return {**show(self.notice, f"Loading {run.final} in the Chat tab…", "info"),
                self.tabs: gr.Tabs(selected="chat")}

    # ------------------------------------------------------------------ wiring
    def wire(self, services: Services, tabs: gr.Tabs, model_timer: gr.Timer) -> None:
        self.chat, self.tabs = services.chat, tabs
        g = guard(self.notice)
        view = [self.run_picker, self.status, self.plot, self.log, self.timer]
        self.check_btn.click(g(self.check), self.form, [self.plan, self.notice])
        self.start_btn.click(g(self.start), self.form, [*view, self.notice])
        self.export_btn.click(g(self.export_chats), [self.chats, self.data], [self.data, self.notice])
        self.timer.tick(self.show_run, [self.run_picker, self.log_scale], view, **QUIET)
        for trigger in (self.run_picker.input, self.log_scale.input):
            trigger(g(self.show_run), [self.run_picker, self.log_scale], view, **QUIET)
        self.stop_btn.click(g(self.stop), [self.run_picker], [self.notice], **QUIET)
        self.resume_btn.click(g(self.resume), [self.run_picker, self.log_scale], [*view, self.notice])
        self.chat_btn.click(g(self.chat_with), [self.run_picker], [self.notice, tabs]) \
            .then(lambda: gr.Timer(active=True), None, [model_timer], **QUIET)

    def on_load(self) -> dict:
        chats = [(c.display_title, c.id) for c in self.history.list(limit=200)]
        return {**self.show_run(None), self.chats: gr.update(choices=chats)}


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _preset_field(label: str, elem_id: str, info: str | None = None) -> gr.Textbox:
    """A setting left empty for the stage presets to decide. A textbox, not gr.Number: gradio's number field
    cannot start empty (it shows and sends 0), and 0 is not "the preset" (a warm-up of 0 steps is a choice)."""
    return gr.Textbox(label=label, placeholder="preset", info=info, lines=1, max_lines=1, elem_id=elem_id)


def _number(value, name: str, whole: bool = True) -> int | float | None:
    """A field's number; None when it is empty. The ranges are RunRequest's to check."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        raise TrainingError(f"{name}: {text!r} is not a number.") from None
    if not whole:
        return number
    if not number.is_integer():
        raise TrainingError(f"{name} must be a whole number, got {text!r}.")
    return int(number)


def loss_frame(metrics: list[dict], log_scale: bool) -> pd.DataFrame:
    steps = [m for m in metrics if m.get("type") == "step" and m.get("loss") is not None]
    frame = pd.DataFrame({"step": list(range(1, len(steps) + 1)),  # steps of all stages, one after another
                          "loss": [math.log10(m["loss"]) if log_scale and m["loss"] > 0 else m["loss"] for m in steps],
                          "stage": [f"stage {m['stage']}" for m in steps]})
    return frame


def status_markdown(run: TrainingRun, metrics: list[dict]) -> str:
    steps = [m for m in metrics if m.get("type") == "step"]
    lines = [f"**{run.status.capitalize()}** · run `{run.id}` · folder `{run.out_dir}`"]
    if steps:
        last = steps[-1]
        done = last["step"] / max(1, last.get("total_steps") or last["step"])
        lines.append(f"Stage {last['stage']}: step {last['step']} of {last.get('total_steps', '?')} ({done:.0%}) · "
                     f"loss {last['loss']:.4f} · lr {last['lr']:.2e} · {last.get('tokens_per_s', 0):.0f} tokens/s")
    evals = [m for m in metrics if m.get("type") == "eval"]
    if evals:
        lines.append("Last evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in evals[-1].items()
                                                     if isinstance(v, float)))
    if run.final:
        lines.append(f"Checkpoint: `{run.final}`")
    if run.error:
        lines.append(f"```\n{run.error}\n```")
    return "\n\n".join(lines)


def plan_markdown(plan: dict) -> str:
    data = plan["data"]
    samples = data.get("samples", {})
    lines = [f"**Data:** {samples.get('multimodal', 0)} multimodal and {samples.get('language', 0)} text-only samples, "
             f"{data.get('images', {}).get('count', 0)} images; no problems found.", "",
             "| stage | samples | steps | batch | lr | schedule | warm-up | seq len | memory |", "|---|---|---|---|---|---|---|---|---|"]
    for s in plan["stages"]:
        c, memory = s["config"], s.get("memory") or {}
        need = f"{memory['total_bytes'] / 2**30:.2f} GiB" if memory.get("total_bytes") else "?"
        fits = "" if memory.get("fits", True) else " ⚠ does not fit"
        grown = f" (grown from {s['grown_from']})" if s.get("grown_from") else ""
        lines.append(f"| {s['stage']} {s['name']} | {s['samples']} | {c['steps']} | {c['batch_size']} | {c['lr']:g} | "
                     f"{c['schedule']} | {c['warmup_steps']} | {c['seq_len']}{grown} | {need}{fits} |")
    advice = {a for s in plan["stages"] if not (s.get("memory") or {}).get("fits", True)
              for a in s["memory"].get("advice", [])}
    if advice:
        lines += ["", "To fit: " + "; ".join(sorted(advice))]
    return "\n".join(lines)
