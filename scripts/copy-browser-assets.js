// Copies the browser files the sipwire console serves out of the npm packages pinned in package-lock.json
// into console/static/<package>/, which is generated (git-ignored) and shipped as package data in the wheel.
// The console serves those files itself, in a checkout and in an installed wheel alike (console/assets.py),
// never from a CDN. `npm ci` runs this as the root package's postinstall script; `npm run postinstall` reruns it.
//
// Only the files listed here are copied (plus each package's licence texts, which travel with the code);
// the folder is emptied first, so nothing from an earlier version is left behind for the wheel to pick up.
"use strict";

const fs = require("fs");
const path = require("path");

const ROOT = path.resolve(__dirname, "..");
const STATIC = path.join(ROOT, "console", "static");

// package name -> files inside the package, copied flat into console/static/<package>/
const FILES = {
  "htmx.org": ["dist/htmx.min.js", "LICENSE"],
  "swagger-ui-dist": [
    "swagger-ui-bundle.js", // Swagger UI with its standalone preset, as FastAPI's /docs page loads it
    "swagger-ui.css",
    "swagger-ui.css.map", // named by swagger-ui.css; only developer tools fetch it
    "favicon-32x32.png",
    "LICENSE",
    "NOTICE",
    "swagger-ui-bundle.js.LICENSE.txt",
  ],
};

function main() {
  fs.rmSync(STATIC, { recursive: true, force: true });
  for (const [name, files] of Object.entries(FILES)) {
    const source = path.join(ROOT, "node_modules", name);
    const { version } = JSON.parse(fs.readFileSync(path.join(source, "package.json"), "utf8"));
    const target = path.join(STATIC, name);
    fs.mkdirSync(target, { recursive: true });
    for (const file of files) {
      fs.copyFileSync(path.join(source, file), path.join(target, path.basename(file)));
    }
    console.log(`sipwire: copied ${files.length} files of ${name}@${version} to ${path.relative(ROOT, target)}/`);
  }
}

try {
  main();
} catch (error) {
  console.error(`sipwire: cannot copy the console's browser assets: ${error.message}`);
  process.exit(1);
}
