// Validate every KEDA and Prometheus-operator document of the given YAML files against the
// schemas kubernetes-models generates from the upstream CRDs. Exit 1 on the first invalid one.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { ScaledObject, TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "keda.sh/v1alpha1/TriggerAuthentication": TriggerAuthentication,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};

let checked = 0;
let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    const data = doc.toJS();
    if (!data || !data.apiVersion) continue;
    const key = `${data.apiVersion}/${data.kind}`;
    const Model = models[key];
    if (!Model) {
      if (data.apiVersion.includes("keda.sh") || data.apiVersion.includes("coreos.com")) {
        console.error(`${file}: no schema for ${key}`);
        failed++;
      }
      continue;
    }
    try {
      new Model(data).validate();
      checked++;
    } catch (error) {
      console.error(`${file}: ${key} ${data.metadata?.name}: ${error.message}`);
      failed++;
    }
  }
}
console.log(`${checked} custom resources valid, ${failed} invalid`);
process.exit(failed ? 1 : 0);
