// One input form per task type. A form renders into a container and offers
//   read()                  -> the request's `input` (text or object), throwing Error on a missing field;
//   remember(input, answer) -> keeps a conversation going (persona, coqa) after an answer.

const E2E_SLOTS = ["name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"];
const E2E_EXAMPLE = [["name", "The Eagle"], ["eatType", "coffee shop"], ["food", "French"], ["area", "riverside"],
  ["familyFriendly", "yes"]];

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function field(label, control) {
  return element("label", { class: "block" }, label, control);
}

function lines(textarea) {
  return textarea.value.split("\n").map((l) => l.trim()).filter(Boolean);
}

function required(value, what) {
  if (!value.trim()) throw new Error(`${what} is empty`);
  return value.trim();
}

/** E2E: a slot editor; the meaning representation `slot[value], …` is built from the rows. */
function e2eForm(container) {
  const rows = element("div", { class: "slots" });
  const preview = element("code", { id: "mr-preview" });
  const update = () => { preview.textContent = mr(); };
  const addRow = (slot = "name", value = "") => {
    const select = element("select", { class: "slot-name" },
      ...E2E_SLOTS.map((s) => element("option", { value: s, text: s })));
    select.value = slot;
    const input = element("input", { class: "slot-value", type: "text", value, placeholder: "value" });
    const remove = element("button", { type: "button", class: "small", title: "remove slot", text: "−" });
    const row = element("div", { class: "slot" }, select, input, remove);
    remove.addEventListener("click", () => { row.remove(); update(); });
    for (const control of [select, input]) control.addEventListener("input", update);
    rows.append(row);
  };
  const mr = () => [...rows.querySelectorAll(".slot")]
    .map((row) => [row.querySelector(".slot-name").value, row.querySelector(".slot-value").value.trim()])
    .filter(([, value]) => value)
    .map(([slot, value]) => `${slot}[${value}]`).join(", ");
  const add = element("button", { type: "button", class: "small", text: "+ slot" });
  add.addEventListener("click", () => { addRow(); update(); });
  E2E_EXAMPLE.forEach(([slot, value]) => addRow(slot, value));
  container.append(element("p", { class: "muted", text: "meaning representation" }), rows, add,
    element("p", {}, "sent as ", preview));
  update();
  return { read: () => required(mr(), "the meaning representation"), remember() {} };
}

/** Labelled text boxes (`rows` given) and lines, appended to the container; returned by name. */
function fields(container, specs) {
  const controls = {};
  for (const { name, label, rows, value = "", placeholder = "" } of specs) {
    const control = rows ? element("textarea", { name, rows, placeholder })
      : element("input", { name, type: "text", placeholder });
    control.value = value;
    container.append(field(label, control));
    controls[name] = control;
  }
  return controls;
}

/** Persona chat: persona lines, the conversation so far, and the user's next message. */
function personaForm(container) {
  const { persona, history, message } = fields(container, [
    { name: "persona", label: "persona (one sentence a line)", rows: 3, value: "i love to cook.\ni have two dogs." },
    { name: "history", label: "history", rows: 4, placeholder: "earlier turns, one per line, alternating" },
    { name: "message", label: "your message", value: "hi! what do you like to do?" },
  ]);
  return {
    read: () => ({ persona: lines(persona), history: [...lines(history), required(message.value, "your message")] }),
    remember(input, answer) {
      history.value = [...input.history, answer.trim()].join("\n");
      message.value = "";
    },
  };
}

/** CoQA: a story, the questions and answers so far (`question | answer` a line), and the next question. */
function coqaForm(container) {
  const { story, history, question } = fields(container, [
    { name: "story", label: "story", rows: 5,
      value: "Anna has a small red boat. Every Sunday she sails it across the lake to visit her grandmother." },
    { name: "history", label: "earlier questions (question | answer a line)", rows: 3, placeholder: "question | answer" },
    { name: "question", label: "question", value: "What color is the boat?" },
  ]);
  const pairs = () => lines(history).map((line) => {
    const [q, ...a] = line.split("|");
    if (!a.length) throw new Error(`history line "${line}" needs "question | answer"`);
    return [q.trim(), a.join("|").trim()];
  });
  return {
    read: () => ({ story: required(story.value, "the story"), history: pairs(),
      question: required(question.value, "the question") }),
    remember(input, answer) {
      history.value = [...input.history, [input.question, answer.trim()]].map(([q, a]) => `${q} | ${a}`).join("\n");
      question.value = "";
    },
  };
}

const TEXT_PLACEHOLDERS = {
  translate: "A man is riding a bicycle down the street.",
  summarize: "Paste an article to summarize.",
};

/** translate, summarize, text2text and any other text task: one text box. */
function textForm(container, type) {
  const { text } = fields(container, [
    { name: "text", label: `${type} input`, rows: type === "summarize" ? 8 : 3, value: TEXT_PLACEHOLDERS[type] || "" },
  ]);
  return { read: () => required(text.value, "the input"), remember() {} };
}

const VAE_OPERATIONS = {
  interpolate: ["a", "b", "steps"],
  reconstruct: ["texts"],
  sample: ["n"],
  analogy: ["a", "b", "c"],
};

/** A sentence VAE: an operation of /v1/vae/{task}/… and its inputs; `read()` gives { operation, body }. */
function vaeForm(container) {
  const operation = element("select", { name: "operation" },
    ...Object.keys(VAE_OPERATIONS).map((name) => new Option(name, name)));
  container.append(field("operation", operation));
  const inputs = fields(container, [
    { name: "a", label: "sentence a", rows: 1, value: "a man is playing a guitar ." },
    { name: "b", label: "sentence b", rows: 1, value: "two dogs run through the snow ." },
    { name: "c", label: "sentence c (analogy: a is to b as c is to …)", rows: 1, value: "a woman is singing ." },
    { name: "texts", label: "sentences to reconstruct, one per line", rows: 3, value: "a man is playing a guitar ." },
  ]);
  const count = (label, value, min) => element("input", { type: "number", name: label, value, min, step: 1 });
  const steps = count("steps", 5, 2);
  const n = count("n", 3, 1);
  container.append(field("interpolation points", steps), field("prior samples", n));
  const shown = { ...inputs, steps, n };
  const show = () => {
    for (const [name, control] of Object.entries(shown)) {
      control.closest("label").hidden = !VAE_OPERATIONS[operation.value].includes(name);
    }
  };
  operation.addEventListener("change", show);
  show();
  const values = {
    a: () => required(inputs.a.value, "sentence a"), b: () => required(inputs.b.value, "sentence b"),
    c: () => required(inputs.c.value, "sentence c"), texts: () => lines(inputs.texts),
    steps: () => Number(steps.value), n: () => Number(n.value),
  };
  return {
    vae: true,
    read: () => ({ operation: operation.value,
      body: Object.fromEntries(VAE_OPERATIONS[operation.value].map((name) => [name, values[name]()])) }),
    remember() {},
  };
}

const FORMS = { e2e: e2eForm, persona: personaForm, coqa: coqaForm, sentence_vae: vaeForm };

export function createForm(taskType, container) {
  container.replaceChildren();
  return (FORMS[taskType] || textForm)(container, taskType);
}
