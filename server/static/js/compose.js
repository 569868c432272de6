// The "compose adapters" controls: AdapterHub's Average or Stack over the chosen task and up to three more
// adapters, sent as the request's `compose` field (the chosen task lays out the prompt).

const MAX_MORE = 3;  // with the chosen task: the server's limit of 4 adapters per composition

/** Builds the member rows into `container` (a select and a weight per row). */
export function createComposeControls(container) {
  const rows = [];
  for (let i = 0; i < MAX_MORE; i += 1) {
    const row = document.createElement("div");
    row.className = "row compose-member";
    const task = Object.assign(document.createElement("select"), { className: "compose-task" });
    const weight = Object.assign(document.createElement("input"),
      { type: "number", className: "compose-weight", value: "1", min: "0.01", step: "any", title: "weight (average)" });
    row.append(Object.assign(document.createElement("label"), { textContent: `adapter ${i + 2} ` }), task, weight);
    container.append(row);
    rows.push({ task, weight });
  }
  return rows;
}

/** Fills every member select with the composable tasks (VLM adapters), keeping choices still offered. */
export function fillComposeTasks(rows, tasks) {
  const offered = tasks.filter((task) => task.task_type !== "sentence_vae");
  for (const { task } of rows) {
    const chosen = task.value;
    task.replaceChildren(new Option("—", ""), ...offered.map((t) => new Option(`${t.name} (${t.task_type})`, t.name)));
    if (offered.some((t) => t.name === chosen)) task.value = chosen;
  }
}

/** The `compose` field for a request to `first` (undefined when no block is chosen). */
export function composition(block, first, firstWeight, rows) {
  if (!block) return undefined;
  const members = [{ task: first, weight: Number(firstWeight) || 1 }];
  for (const { task, weight } of rows) {
    if (task.value) members.push({ task: task.value, weight: Number(weight.value) || 1 });
  }
  if (members.length < 2) throw new Error("choose at least one more adapter to compose with");
  return block === "average" ? { average: members } : { stack: members.map((m) => m.task) };
}
