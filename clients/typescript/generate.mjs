// Writes the client's types from an OpenAPI spec: `node generate.mjs [spec] [output]`, by
// default openapi/api.json → schema.d.ts. The options live here, so `npm run generate` and the
// tests generate the same types.
import { readFile, writeFile } from "node:fs/promises";
import openapiTS, { astToString } from "openapi-typescript";

const [input = "../../openapi/api.json", output = "schema.d.ts"] = process.argv.slice(2);
const spec = JSON.parse(await readFile(input, "utf8"));
const ast = await openapiTS(spec, {
  // A property with a default may be left out of a request: it stays optional in the types.
  defaultNonNullable: false,
});
await writeFile(output, astToString(ast));
console.log(`wrote ${output}`);
