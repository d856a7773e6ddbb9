#!/usr/bin/env bash
# Provide a Nextflow launcher at .cache/nextflow/bin/nextflow (used by `make nextflow`, hence by make test/demo).
#
# 1. A `nextflow` already on PATH whose version satisfies manifest.nextflowVersion in nextflow.config is used.
# 2. Otherwise the release pinned in tools/nextflow/pom.xml is resolved from Maven Central with mvn into
#    .cache/nextflow/<version>/lib and a launcher script is written: java + the --add-opens flags of the official
#    launcher + main class nextflow.cli.Launcher, with NXF_HOME exported.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache="$root/.cache/nextflow"
launcher="$cache/bin/nextflow"
pom="$root/tools/nextflow/pom.xml"
pinned=$(sed -n 's:.*<nextflow.version>\(.*\)</nextflow.version>.*:\1:p' "$pom")
minimum=$(sed -n "s/.*nextflowVersion *= *'!\?>=\([0-9.]*\)'.*/\1/p" "$root/nextflow.config")
[ -n "$pinned" ] && [ -n "$minimum" ] || { echo "bootstrap: cannot read the pinned/minimum Nextflow version" >&2; exit 1; }

version_ok() {  # $1 >= $minimum ?
    [ "$(printf '%s\n%s\n' "$minimum" "$1" | sort -V | head -n1)" = "$minimum" ]
}

mkdir -p "$cache/bin"

# 1. a nextflow on PATH (not our own launcher)
if found=$(PATH=$(echo "$PATH" | tr ':' '\n' | grep -v "^$cache/bin\$" | paste -sd:) command -v nextflow 2>/dev/null); then
    have=$("$found" -version 2>/dev/null | sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p' | head -n1 || true)
    if [ -n "$have" ] && version_ok "$have"; then
        ln -sf "$found" "$launcher"
        echo "nextflow: using $found (version $have >= $minimum)" >&2
        exit 0
    fi
    echo "nextflow: $found is version ${have:-unknown}, below the required $minimum; using the pinned $pinned" >&2
fi

# 2. the pinned release from Maven Central
lib="$cache/$pinned/lib"
if [ ! -f "$lib/.complete" ]; then
    command -v java >/dev/null || { echo "bootstrap: java (>= 17) is required to run Nextflow" >&2; exit 1; }
    command -v mvn >/dev/null || { echo "bootstrap: mvn is required to fetch Nextflow $pinned from Maven Central" >&2; exit 1; }
    jv=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
    [ "${jv:-0}" -ge 17 ] || { echo "bootstrap: Nextflow $pinned needs Java >= 17 (found ${jv:-none})" >&2; exit 1; }
    echo "nextflow: resolving io.nextflow:nextflow:$pinned from Maven Central into $lib" >&2
    rm -rf "$lib"
    # Maven 3.8's console prints ANSI reset codes even in batch mode with colours off: strip them from the log
    mvn -B -q -Dstyle.color=never -f "$pom" dependency:copy-dependencies -DoutputDirectory="$lib" -DincludeScope=runtime \
        2>&1 | sed -u 's/\x1b\[[0-9;]*[A-Za-z]//g' >&2
    touch "$lib/.complete"
fi

cat > "$launcher.tmp" <<LAUNCHER
#!/usr/bin/env bash
# Nextflow $pinned launched from Maven-resolved jars (written by tools/nextflow/bootstrap.sh).
export NXF_HOME="\${NXF_HOME:-\$HOME/.nextflow}"
export NXF_CLI="\$0 \$*"
unset JAVA_TOOL_OPTIONS
java_cmd="\${NXF_JAVA_HOME:+\$NXF_JAVA_HOME/bin/java}"
java_cmd="\${java_cmd:-\${JAVA_HOME:+\$JAVA_HOME/bin/java}}"
java_cmd="\${java_cmd:-java}"
export JAVA_CMD="\$java_cmd"
opens=""
for p in java.lang java.io java.nio java.net java.util java.util.concurrent.locks java.util.concurrent.atomic \\
         java.nio.file.spi sun.nio.ch sun.nio.fs sun.net.www.protocol.http sun.net.www.protocol.https \\
         sun.net.www.protocol.ftp sun.net.www.protocol.file jdk.internal.misc jdk.internal.vm java.util.regex; do
    opens="\$opens --add-opens=java.base/\$p=ALL-UNNAMED"
done
tiered=""
case " \$* " in *" run "*|*" node "*) ;; *) tiered="-XX:+TieredCompilation -XX:TieredStopAtLevel=1" ;; esac
exec "\$java_cmd" -Dfile.encoding=UTF-8 -Dcom.sun.security.enableAIAcaIssuers=true -Djava.awt.headless=true \\
    \$tiered \${NXF_OPTS:-} \${NXF_JVM_ARGS:-} \$opens -cp "$lib/*" nextflow.cli.Launcher "\$@"
LAUNCHER
chmod +x "$launcher.tmp"
mv -f "$launcher.tmp" "$launcher"
echo "nextflow: $("$launcher" -version 2>/dev/null | sed -n 's/.*\(version [0-9][^ ]*\).*/\1/p' | head -n1) at $launcher" >&2
