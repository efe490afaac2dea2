#!/usr/bin/env bash
# The learning benchmark's corpus: full-length songs (>= 60 s) of several styles from Debian
# packages that ship game soundtracks, split into two halves that share no song:
#   OUT/tune     the half that defaults and presets are tuned on;
#   OUT/heldout  the half the README's figures come from.
# Every package's songs are sorted by name and dealt alternately (1st to tune, 2nd to heldout,
# ...), so both halves hold every style. Rebuilt the same from the same package versions;
# idempotent (a song already in place is kept). The tests keep using asc-music, not this.
#
#   bash benchmarks/make_corpus.sh [OUT]     (default bench-output/corpus; needs apt-get
#                                             download, dpkg-deb, ffprobe and python3)
set -euo pipefail
out=$(realpath -m "${1:-bench-output/corpus}")
# package: the folder inside it that holds its music (a .pk3 is a zip of .ogg files)
packages=(
  "wesnoth-1.16-music:usr/share/games/wesnoth/1.16/data/core/music"  # orchestral
  "warzone2100-music:usr/share/games/warzone2100/music"              # electronic, ambient
  "nexuiz-music:usr/share/games/nexuiz/data/music.pk3"               # techno, metal
  "extremetuxracer-data:usr/share/games/etr/music"                   # pop, chiptune
  "lincity-ng-data:usr/share/games/lincity-ng/music"                 # blues, ambient
  "freeorion-data:usr/share/games/freeorion/default/data/sound"      # space ambient
)
debs="$out/.debs"
mkdir -p "$debs" "$out/tune" "$out/heldout"
for entry in "${packages[@]}"; do
  package=${entry%%:*} inside=${entry#*:}
  unpacked="$debs/$package"
  if [ ! -d "$unpacked" ]; then
    (cd "$debs" && apt-get download -q "$package" 2>&1 >/dev/null | grep -v unsandboxed >&2 || true)
    dpkg-deb -x "$debs/${package}"_*.deb "$unpacked.tmp" && mv "$unpacked.tmp" "$unpacked"
    rm -f "$debs/${package}"_*.deb
  fi
  source="$unpacked/$inside"
  if [[ "$source" == *.pk3 ]]; then  # a zip: its songs unpacked beside it
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
      "$source" "$source.d"
    source="$source.d"
  fi
  half=tune
  while IFS= read -r -d '' song; do
    seconds=$(ffprobe -v error -show_entries format=duration -of csv=p=0 "$song")
    awk -v s="$seconds" 'BEGIN { exit !(s >= 60) }' || continue
    name="${package%%-*}--$(realpath --relative-to="$source" "$song" | tr '/ ' '__')"
    [ -e "$out/$half/$name" ] || cp "$song" "$out/$half/$name"
    half=$([ "$half" = tune ] && echo heldout || echo tune)
  done < <(find "$source" -type f \( -name '*.ogg' -o -name '*.opus' \) -print0 | sort -z)
done
for half in tune heldout; do
  echo "$out/$half: $(ls "$out/$half" | wc -l) songs, $(du -sh "$out/$half" | cut -f1)"
done
