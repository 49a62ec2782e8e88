// Checks Kubernetes manifests offline against the Kubernetes API schema, with the npm package
// kubernetes-models (its classes validate an object against the API's OpenAPI schema), and also
// rejects fields that the schema does not know, as `kubectl apply --validate=strict` would: a
// misspelt `livenesProbe` is otherwise silently ignored by the API server.
//
//   NODE_PATH=<dir with kubernetes-models and yaml> node deploy/k8s/validate.js deploy/k8s/*.yaml
//
// Prints the documents as one JSON array on success; exits 1 with every problem on stderr otherwise.
"use strict";
const fs = require("fs");
const YAML = require("yaml");

// Wrap a document so that every property the schema's validator reads is recorded (per object, over
// every proxy of it): the validator reads exactly the properties the schema defines (and every key
// of a free-form map such as labels), so an own key never read is unknown to the schema.
function track(value, path, seen) {
  if (value === null || typeof value !== "object") return value;
  if (!seen.has(value)) seen.set(value, { path, read: new Set() });
  const { read } = seen.get(value);
  return new Proxy(value, {
    get(target, key, receiver) {
      if (typeof key === "string") read.add(key);
      const child = Reflect.get(target, key, receiver);
      if (typeof key !== "string" || !Object.prototype.hasOwnProperty.call(target, key)) return child;
      return track(child, Array.isArray(target) ? `${path}[${key}]` : `${path}.${key}`, seen);
    },
  });
}

function modelClass(doc) {
  const [group, version] = doc.apiVersion.includes("/") ? doc.apiVersion.split("/") : [null, doc.apiVersion];
  const module = require(group ? `kubernetes-models/${group}/${version}` : `kubernetes-models/${version}`);
  if (!module[doc.kind]) throw new Error(`unknown kind ${doc.kind} in ${doc.apiVersion}`);
  return module[doc.kind];
}

const problems = [];
const documents = [];
for (const file of process.argv.slice(2)) {
  for (const parsed of YAML.parseAllDocuments(fs.readFileSync(file, "utf8"))) {
    if (parsed.errors.length) {
      problems.push(`${file}: ${parsed.errors.map(String).join("; ")}`);
      continue;
    }
    const doc = parsed.toJS();
    if (doc === null) continue;
    const where = `${file}: ${doc.kind || "?"} ${(doc.metadata && doc.metadata.name) || "?"}`;
    try {
      const Model = modelClass(doc);
      new Model(doc).validate();
      const seen = new Map();
      Model.prototype.validate.call(track(doc, "", seen));
      for (const [value, { path, read }] of seen) {
        if (Array.isArray(value)) continue;
        for (const key of Object.keys(value)) {
          if (!read.has(key)) problems.push(`${where}: unknown field ${path}.${key}`);
        }
      }
      documents.push({ file, ...doc });
    } catch (error) {
      problems.push(`${where}: ${error.message}`);
    }
  }
}
if (problems.length) {
  process.stderr.write(problems.join("\n") + "\n");
  process.exit(1);
}
process.stdout.write(JSON.stringify(documents, null, 1) + "\n");
